//! VirtualMachineMigrations, the controller's half: admit a migration (the VM runs, no
//! other migration of it is under way, the concurrency limits allow one more), choose its
//! target with the scheduler (the source excluded, only nodes that can receive it), and
//! hand it to the agents. The source agent copies the VM and finishes the migration.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, ResourceExt};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use serde_json::json;

use super::binding::{self, Binding};
use super::scheduler::{self, Candidate, Placed};
use super::{Context, FIELD_MANAGER};
use crate::api::vm::Phase;
use crate::api::{
    MIGRATION_FINALIZER, MigrationPhase, VirtualMachine, VirtualMachineMigration,
    VirtualMachineMigrationStatus,
};

/// A migration whose target has not said it is ready after this long fails.
const PREPARE_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes: {0}")]
    Kube(#[from] kube::Error),
}

/// How many migrations may be under way at once (KubeVirt's defaults: 2 and 5).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub per_node: usize,
    pub cluster: usize,
}

/// Why a migration cannot start now, or cannot happen at all.
#[derive(Debug, PartialEq)]
pub enum Verdict {
    /// Start it: move from `source` to `target`.
    Go { source: String, target: String },
    /// Try again later.
    Wait {
        reason: &'static str,
        message: String,
    },
    /// Never: the migration fails.
    Refuse {
        reason: &'static str,
        message: String,
    },
}

/// The active migrations (Scheduling or Running) other than `me`, as (source, target).
fn active<'a>(
    all: &'a [Arc<VirtualMachineMigration>],
    me: &VirtualMachineMigration,
) -> impl Iterator<Item = (&'a str, &'a str)> {
    let me = me.uid();
    all.iter().filter(move |m| m.uid() != me).filter_map(|m| {
        let s = m.status.as_ref()?;
        s.phase.filter(|p| p.active())?;
        Some((
            s.source_node.as_deref().unwrap_or(""),
            s.target_node.as_deref().unwrap_or(""),
        ))
    })
}

/// The admission and placement decision, pure: the VM, the other migrations in the
/// cluster, the hypervisors and the placed VMs as the scheduler sees them.
#[allow(clippy::too_many_arguments)]
pub fn decide(
    m: &VirtualMachineMigration,
    vm: Option<&VirtualMachine>,
    all: &[Arc<VirtualMachineMigration>],
    request: Option<scheduler::Request>,
    candidates: &[Candidate],
    compatible: &dyn Fn(&str, &str) -> Result<(), String>,
    placed: &[Placed],
    limits: Limits,
    ctx: (scheduler::Strategy, scheduler::Weights),
) -> Verdict {
    let (vm, source) = match admissible(m, vm, all, limits) {
        Ok(ok) => ok,
        Err(verdict) => return verdict,
    };
    let Some(mut req) = request else {
        return Verdict::Refuse {
            reason: "InvalidSpec",
            message: "the VM's size is unknown".into(),
        };
    };
    // The VM itself is placed on the source: it must not count against its own
    // anti-affinity on the target.
    let placed: Vec<Placed> = placed
        .iter()
        .filter(|p| !(p.node == source && p.labels == req.labels && p.namespace == req.namespace))
        .cloned()
        .collect();
    let mut refused = Vec::new();
    let eligible: Vec<Candidate> = candidates
        .iter()
        .filter(|c| c.name != source)
        .filter(|c| m.spec.target_node.as_ref().is_none_or(|t| *t == c.name))
        .filter(|c| match compatible(&source, &c.name) {
            Ok(()) => true,
            Err(why) => {
                refused.push(format!("{}: {why}", c.name));
                false
            }
        })
        .cloned()
        .collect();
    if let Some(t) = &m.spec.target_node {
        if *t == source {
            return Verdict::Refuse {
                reason: "SameNode",
                message: format!("the VM already runs on {t}"),
            };
        }
        if !candidates.iter().any(|c| c.name == *t) {
            return Verdict::Refuse {
                reason: "NoTarget",
                message: format!("node {t} is not a hypervisor"),
            };
        }
    }
    req.node_selector = vm.spec.node_selector.clone();
    match scheduler::schedule(&req, &eligible, &placed, ctx.0, ctx.1) {
        Ok(target) => Verdict::Go { source, target },
        Err(why) => {
            let mut message = format!("no node can take the VM: {why}");
            if !refused.is_empty() {
                message.push_str(&format!("; incompatible: {}", refused.join(", ")));
            }
            // Capacity and cordons change; a target that cannot receive VMs at all
            // (another accelerator, no migration endpoint) will not.
            if eligible.is_empty() && !refused.is_empty() {
                Verdict::Refuse {
                    reason: "IncompatibleTarget",
                    message,
                }
            } else {
                Verdict::Wait {
                    reason: "NoTarget",
                    message,
                }
            }
        }
    }
}

/// The checks before any target is looked at: the VM exists, is bound and runs, no other
/// migration of it is unsettled, and the limits allow one more. The VM and its node.
fn admissible<'v>(
    m: &VirtualMachineMigration,
    vm: Option<&'v VirtualMachine>,
    all: &[Arc<VirtualMachineMigration>],
    limits: Limits,
) -> Result<(&'v VirtualMachine, String), Verdict> {
    let Some(vm) = vm else {
        return Err(Verdict::Refuse {
            reason: "VMNotFound",
            message: format!("VirtualMachine {} does not exist", m.spec.vm_name),
        });
    };
    let status = vm.status.clone().unwrap_or_default();
    let Some(source) = status.node_name.clone() else {
        return Err(Verdict::Refuse {
            reason: "NotRunning",
            message: "the VM is not bound to a node".into(),
        });
    };
    let ns = m.namespace();
    let same_vm = all.iter().any(|o| {
        o.uid() != m.uid()
            && o.namespace() == ns
            && o.spec.vm_name == m.spec.vm_name
            && o.unsettled()
    });
    if same_vm {
        return Err(Verdict::Wait {
            reason: "AlreadyMigrating",
            message: "another migration of this VM is under way".into(),
        });
    }
    if status.phase == Some(Phase::Migrating) {
        // The last migration's source wrote it; its target has not written Running yet.
        return Err(Verdict::Wait {
            reason: "AlreadyMigrating",
            message: "the VM's last migration has not settled".into(),
        });
    }
    if status.phase != Some(Phase::Running) {
        return Err(Verdict::Refuse {
            reason: "NotRunning",
            message: format!(
                "the VM is {}: only a running VM migrates live (a stopped one starts wherever it is scheduled next)",
                status.phase.map(|p| p.as_str()).unwrap_or("not started")
            ),
        });
    }
    let others: Vec<_> = active(all, m).collect();
    let from_source = others.iter().filter(|(s, _)| *s == source).count();
    if from_source >= limits.per_node {
        return Err(Verdict::Wait {
            reason: "Throttled",
            message: format!(
                "{from_source} migrations from {source} under way (limit {} per node)",
                limits.per_node
            ),
        });
    }
    if others.len() >= limits.cluster {
        return Err(Verdict::Wait {
            reason: "Throttled",
            message: format!(
                "{} migrations under way (limit {} in the cluster)",
                others.len(),
                limits.cluster
            ),
        });
    }
    Ok((vm, source))
}

async fn write_status(
    m: &VirtualMachineMigration,
    ctx: &Context,
    status: VirtualMachineMigrationStatus,
) -> Result<(), Error> {
    if m.status.as_ref() == Some(&status) {
        return Ok(());
    }
    let api: Api<VirtualMachineMigration> =
        Api::namespaced(ctx.client.clone(), &m.namespace().unwrap_or_default());
    let patch = json!({
        "apiVersion": "vmlet.dev/v1alpha1",
        "kind": "VirtualMachineMigration",
        "metadata": {"resourceVersion": m.resource_version()},
        "status": status,
    });
    api.patch_status(
        &m.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

/// A Scheduling migration fails when its target has not said it is ready (TargetReady)
/// within PREPARE_TIMEOUT of being chosen; a queued request waited for its turn first.
async fn watch_preparation(m: &VirtualMachineMigration, ctx: &Context) -> Result<Action, Error> {
    let old = m.status.clone().unwrap_or_default();
    let since = old
        .scheduled_time
        .as_ref()
        .or(m.metadata.creation_timestamp.as_ref())
        .map(|t| Timestamp::now().duration_since(t.0).unsigned_abs())
        .unwrap_or_default();
    let ready =
        crate::api::conditions::is_true(&old.conditions, crate::api::conditions::Type::TargetReady);
    if ready || since <= PREPARE_TIMEOUT {
        return Ok(Action::requeue(Duration::from_secs(30)));
    }
    let failed = VirtualMachineMigrationStatus {
        phase: Some(MigrationPhase::Failed),
        reason: Some("TargetTimeout".into()),
        message: Some(format!(
            "the target did not prepare the VM within {} s",
            PREPARE_TIMEOUT.as_secs()
        )),
        completion_time: Some(Time(Timestamp::now())),
        ..old
    };
    write_status(m, ctx, failed).await?;
    Ok(Action::await_change())
}

/// A migration succeeded: the guest runs on the target, and the binding follows it. The
/// controller is the one writer of `status.nodeName`; until this lands (and the
/// finalizer goes) the source agent holds the VM. A VM bound to neither node, or a new
/// VM under the old name, is left alone.
async fn follow_guest(m: &VirtualMachineMigration, ctx: &Context) -> Result<(), Error> {
    let status = m.status.clone().unwrap_or_default();
    let (Some(source), Some(target)) = (status.source_node, status.target_node) else {
        return Ok(());
    };
    let api: Api<VirtualMachine> =
        Api::namespaced(ctx.client.clone(), &m.namespace().unwrap_or_default());
    let Some(vm) = api.get_opt(&m.spec.vm_name).await? else {
        return Ok(());
    };
    let created_before = match (
        &vm.metadata.creation_timestamp,
        &m.metadata.creation_timestamp,
    ) {
        (Some(v), Some(mig)) => v.0 <= mig.0,
        _ => true,
    };
    let node = vm.status.as_ref().and_then(|s| s.node_name.clone());
    if !created_before || node.as_deref() != Some(source.as_str()) {
        return Ok(());
    }
    let new = Binding::of(vm.status.as_ref())
        .bound_to(Some(&target))
        .with(
            &vm,
            crate::api::conditions::Type::Scheduled,
            true,
            // As the binder words it, so that its next look writes nothing.
            "Scheduled",
            format!("bound to {target}"),
        );
    binding::apply(&api, &vm, new).await?;
    tracing::info!(migration = %m.name_any(), vm = %vm.name_any(), %source, %target, "binding moved with the guest");
    Ok(())
}

async fn remove_finalizer(m: &VirtualMachineMigration, ctx: &Context) -> Result<(), Error> {
    let api: Api<VirtualMachineMigration> =
        Api::namespaced(ctx.client.clone(), &m.namespace().unwrap_or_default());
    Ok(crate::patch::remove_finalizer(&api, m, MIGRATION_FINALIZER).await?)
}

pub async fn reconcile(
    m: Arc<VirtualMachineMigration>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let old = m.status.clone().unwrap_or_default();
    let phase = old.phase.unwrap_or(MigrationPhase::Pending);
    if phase == MigrationPhase::Succeeded && m.finalizers().iter().any(|f| f == MIGRATION_FINALIZER)
    {
        follow_guest(&m, &ctx).await?;
    }
    if m.metadata.deletion_timestamp.is_some() {
        // Mid-copy the source agent aborts the copy and lets go; otherwise nothing runs.
        if phase != MigrationPhase::Running {
            remove_finalizer(&m, &ctx).await?;
        }
        return Ok(Action::await_change());
    }
    let now = Time(Timestamp::now());
    let fail = |reason: &str, message: String| VirtualMachineMigrationStatus {
        phase: Some(MigrationPhase::Failed),
        reason: Some(reason.to_string()),
        message: Some(message),
        completion_time: Some(now.clone()),
        ..old.clone()
    };
    match phase {
        MigrationPhase::Succeeded | MigrationPhase::Failed => {
            remove_finalizer(&m, &ctx).await?;
            return Ok(Action::await_change());
        }
        MigrationPhase::Running => return Ok(Action::await_change()),
        MigrationPhase::Scheduling => return watch_preparation(&m, &ctx).await,
        MigrationPhase::Pending => {}
    }
    if !m.finalizers().iter().any(|f| f == MIGRATION_FINALIZER) {
        add_finalizer(&m, &ctx).await?;
        // Its own event brings the object back with the finalizer.
        return Ok(Action::await_change());
    }

    let ns = m.namespace().unwrap_or_default();
    let vm = ctx
        .caches
        .vms
        .get(&ObjectRef::new(&m.spec.vm_name).within(&ns));
    let started = Instant::now();
    let verdict = admit(&m, &ctx, vm.as_deref()).await;
    ctx.metrics.migration_decision(&verdict, started.elapsed());
    match verdict {
        Verdict::Go { source, target } => {
            let status = VirtualMachineMigrationStatus {
                phase: Some(MigrationPhase::Scheduling),
                reason: Some("TargetChosen".into()),
                message: Some(format!("moving from {source} to {target}")),
                source_node: Some(source),
                target_node: Some(target),
                scheduled_time: Some(now.clone()),
                ..Default::default()
            };
            tracing::info!(migration = %m.name_any(), vm = %m.spec.vm_name, ?status.target_node, "migration scheduled");
            let note = status.message.clone().unwrap_or_default();
            write_status(&m, &ctx, status).await?;
            decision_events(
                &ctx,
                &m,
                vm.as_deref(),
                EventType::Normal,
                "MigrationScheduled",
                note,
            );
            Ok(Action::requeue(Duration::from_secs(30)))
        }
        Verdict::Wait { reason, message } => {
            let status = VirtualMachineMigrationStatus {
                phase: Some(MigrationPhase::Pending),
                reason: Some(reason.into()),
                message: Some(message),
                ..Default::default()
            };
            write_status(&m, &ctx, status).await?;
            Ok(Action::requeue(Duration::from_secs(2)))
        }
        Verdict::Refuse { reason, message } => {
            // A refusal is final: make sure it is not the cache's lag speaking.
            let api: Api<VirtualMachine> = Api::namespaced(ctx.client.clone(), &ns);
            let fresh = api.get_opt(&m.spec.vm_name).await?;
            let seen = vm.as_ref().and_then(|v| v.resource_version());
            if fresh.as_ref().and_then(|v| v.resource_version()) != seen {
                return Ok(Action::requeue(Duration::from_secs(1)));
            }
            let note = format!("{reason}: {message}");
            write_status(&m, &ctx, fail(reason, message)).await?;
            decision_events(
                &ctx,
                &m,
                vm.as_deref(),
                EventType::Warning,
                "MigrationRefused",
                note,
            );
            Ok(Action::await_change())
        }
    }
}

/// The admission decision as Events on the migration and on its VM (`kubectl describe`
/// of either says it), once: Scheduled and refused are each a migration's last word here.
fn decision_events(
    ctx: &Context,
    m: &VirtualMachineMigration,
    vm: Option<&VirtualMachine>,
    type_: EventType,
    reason: &str,
    note: String,
) {
    if let Some(vm) = vm {
        let on_vm = format!("migration {}: {note}", m.name_any());
        ctx.record(vm, type_, reason, on_vm, "Migrate");
    }
    ctx.record(m, type_, reason, note, "Migrate");
}

/// The admission decision on the cached view, counting the VM on its target until the
/// cache shows the migration Scheduling.
async fn admit(m: &VirtualMachineMigration, ctx: &Context, vm: Option<&VirtualMachine>) -> Verdict {
    let class = vm.and_then(|vm| ctx.caches.class_of(vm));
    if let Some(vm) = vm {
        // A local volume lives on its node: its VM stays there.
        let pinned = vm.spec.volumes().find(|v| !ctx.caches.shared_volume(vm, v));
        if let Some(v) = pinned {
            return Verdict::Refuse {
                reason: "VolumePinned",
                message: format!(
                    "volume {v} is local to its node: a VM using one does not move (put it on a storage pool to move it)"
                ),
            };
        }
        // So is an image published on a node's local storage: no other node has it.
        if let Ok(super::volumes::Needs { node: Some(n), .. }) = super::volumes::needs_of(ctx, vm) {
            return Verdict::Refuse {
                reason: "ImagePinned",
                message: format!(
                    "the VM's image is published on node {n}'s local storage: no other node has it"
                ),
            };
        }
    }
    let request = vm.and_then(|vm| {
        let class = class.clone()?;
        let mut req = vm
            .spec
            .requests(class.as_ref())
            .map(|r| super::bind::request(vm, class.as_ref(), r))?;
        req.pools = super::volumes::needs_of(ctx, vm).ok()?.pools;
        Some(req)
    });
    let all = ctx.caches.migrations.state();
    let hv = |name: &str| {
        ctx.caches
            .hypervisors
            .get(&ObjectRef::new(name))
            .and_then(|h| h.status.clone())
            .unwrap_or_default()
    };
    let compatible = |source: &str, target: &str| {
        let (s, t) = (hv(source), hv(target));
        if t.migration_uri.is_none() {
            return Err("no migration endpoint (agent --migration-uri)".to_string());
        }
        if s.accel != t.accel {
            return Err(format!(
                "accelerator {} here, {} on the source",
                t.accel.unwrap_or_default(),
                s.accel.unwrap_or_default()
            ));
        }
        Ok(())
    };
    {
        let mut view = ctx.view.lock().await;
        let epoch = ctx.epoch.load(std::sync::atomic::Ordering::SeqCst);
        let (candidates, placed) = view.current(&ctx.caches, ctx.heartbeat_grace, epoch);
        let v = decide(
            m,
            vm,
            &all,
            request.clone(),
            candidates,
            &compatible,
            placed,
            ctx.limits,
            (ctx.strategy, ctx.weights),
        );
        if let (Verdict::Go { target, .. }, Some(req)) = (&v, &request) {
            // Until the cache shows the migration Scheduling, count the VM on its target.
            view.assume(
                format!("migration/{}", m.uid().unwrap_or_default()),
                req,
                target,
            );
        }
        v
    }
}

/// Adds the controller's finalizer with a patch that fails if the object changed.
async fn add_finalizer(m: &VirtualMachineMigration, ctx: &Context) -> Result<(), Error> {
    let api: Api<VirtualMachineMigration> =
        Api::namespaced(ctx.client.clone(), &m.namespace().unwrap_or_default());
    crate::patch::add_finalizer(&api, m, MIGRATION_FINALIZER).await?;
    Ok(())
}

pub fn error_policy(m: Arc<VirtualMachineMigration>, err: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile_error("migration", "kube");
    tracing::warn!(migration = %m.name_any(), error = %err, "migration reconcile failed");
    Action::requeue(Duration::from_secs(2))
}
