//! One VM's reconcile: resolve its class and images, render and define its domain, start
//! or stop it as its run strategy says, and report what is true.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::api::{Api, Patch, PatchParams, ResourceExt};
use kube::runtime::controller::Action;
use serde_json::json;

use super::images::ImageError;
use super::libvirt::{DomainInfo, LibvirtError, RunState};
use super::plan::{self, Step, VmRuntime};
use super::render::{self, LocalImage};
use super::status::{Observed, Problem};
use super::{Context, disks, image_report};
use crate::api::image::ImageFormat;
use crate::api::{
    DOMAIN_FINALIZER, POWER_ANNOTATION, RESTART_ANNOTATION, VirtualMachine, VirtualMachineImage,
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Libvirt(#[from] LibvirtError),
    #[error("kubernetes: {0}")]
    Kube(#[from] kube::Error),
    #[error("disks: {0}")]
    Disks(#[from] disks::DiskError),
    #[error("rendering XML: {0}")]
    Xml(#[from] quick_xml::SeError),
}

impl Error {
    /// The metric label of this error kind.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Libvirt(_) => "libvirt",
            Error::Kube(_) => "kube",
            Error::Disks(_) => "disks",
            Error::Xml(_) => "xml",
        }
    }

    /// The Ready condition's reason when this error is all a VM's status can show.
    fn reason(&self) -> &'static str {
        match self {
            Error::Libvirt(_) => "LibvirtError",
            Error::Kube(_) => "KubernetesError",
            Error::Disks(_) => "DiskError",
            Error::Xml(_) => "RenderFailed",
        }
    }
}

/// A VM's runtime record, taken out of the map for one reconcile (reconciles of one VM
/// never overlap) and put back when dropped, on early returns too.
struct Taken<'a> {
    map: &'a std::sync::Mutex<std::collections::HashMap<String, VmRuntime>>,
    uid: String,
    rt: VmRuntime,
}

impl<'a> Taken<'a> {
    fn new(
        map: &'a std::sync::Mutex<std::collections::HashMap<String, VmRuntime>>,
        uid: &str,
    ) -> Self {
        let rt = map
            .lock()
            .expect("not poisoned")
            .remove(uid)
            .unwrap_or_default();
        Taken {
            map,
            uid: uid.to_string(),
            rt,
        }
    }
}

impl std::ops::Deref for Taken<'_> {
    type Target = VmRuntime;
    fn deref(&self) -> &VmRuntime {
        &self.rt
    }
}

impl std::ops::DerefMut for Taken<'_> {
    fn deref_mut(&mut self) -> &mut VmRuntime {
        &mut self.rt
    }
}

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        if let Ok(mut map) = self.map.lock() {
            map.insert(std::mem::take(&mut self.uid), std::mem::take(&mut self.rt));
        }
    }
}

pub async fn reconcile(vm: Arc<VirtualMachine>, ctx: Arc<Context>) -> Result<Action, Error> {
    let vm = ctx.freshest(vm);
    let ns = vm.namespace().unwrap_or_default();
    let api: Api<VirtualMachine> = Api::namespaced(ctx.client.clone(), &ns);
    let bound_here =
        vm.status.as_ref().and_then(|s| s.node_name.as_deref()) == Some(ctx.node.as_str());
    if !bound_here {
        return Ok(Action::await_change());
    }
    let started = Instant::now();
    let res = finalize_then(&api, &vm, &ctx).await;
    // Never a blank phase on a bound VM: an error before the first status write shows.
    if let Err(e) = &res
        && vm.status.as_ref().and_then(|s| s.phase).is_none()
        && vm.metadata.deletion_timestamp.is_none()
    {
        let problem = Problem::retrying(e.reason(), format!("the agent on {}: {e}", ctx.node));
        if let Err(w) = super::status::write(&vm, &ctx, Observed::default(), Some(problem)).await {
            tracing::debug!(error = %w, "status not written");
        }
    }
    ctx.metrics.reconciled(started.elapsed());
    res
}

/// Whether the object was just read from the API server (not the cache).
#[derive(Clone, Copy, PartialEq)]
enum Freshness {
    Cached,
    Fresh,
}

/// The finalizer protocol, by hand rather than kube's helper: adding the finalizer is
/// one JSON patch that also tests the uid and the binding, so its answer is a fresh read
/// that proves the VM is ours, and the first start needs no further GET or watch round.
async fn finalize_then(
    api: &Api<VirtualMachine>,
    vm: &VirtualMachine,
    ctx: &Context,
) -> Result<Action, Error> {
    let ours = vm.finalizers().iter().any(|f| f == DOMAIN_FINALIZER);
    match plan::entry(vm.metadata.deletion_timestamp.is_some(), ours) {
        plan::Entry::Ignore => return Ok(Action::await_change()),
        plan::Entry::Cleanup => {
            cleanup(vm, ctx).await?;
            crate::patch::remove_finalizer(api, vm, DOMAIN_FINALIZER).await?;
            return Ok(Action::await_change());
        }
        plan::Entry::Apply => return apply(vm, ctx, Freshness::Cached).await,
        plan::Entry::Adopt => {}
    }
    let mut ops = vec![
        json!({"op": "test", "path": "/metadata/uid", "value": vm.metadata.uid}),
        json!({"op": "test", "path": "/status/nodeName", "value": ctx.node}),
    ];
    if vm.finalizers().is_empty() {
        ops.push(json!({"op": "test", "path": "/metadata/finalizers", "value": null}));
        ops.push(json!({"op": "add", "path": "/metadata/finalizers", "value": [DOMAIN_FINALIZER]}));
    } else {
        // The API server does not deduplicate finalizers: fail if the list changed.
        ops.push(json!({"op": "test", "path": "/metadata/finalizers", "value": vm.finalizers()}));
        ops.push(json!({"op": "add", "path": "/metadata/finalizers/-", "value": DOMAIN_FINALIZER}));
    }
    match json_patch(api, vm, serde_json::Value::Array(ops)).await {
        Ok(fresh) => {
            ctx.wrote(fresh.clone());
            apply(&fresh, ctx, Freshness::Fresh).await
        }
        // Gone, rebound, or changed since the cache saw it: its next event brings the news.
        Err(kube::Error::Api(s)) if matches!(s.code, 404 | 409 | 422) => Ok(Action::await_change()),
        Err(e) => Err(e.into()),
    }
}

async fn json_patch(
    api: &Api<VirtualMachine>,
    vm: &VirtualMachine,
    ops: serde_json::Value,
) -> Result<VirtualMachine, kube::Error> {
    let patch: json_patch::Patch = serde_json::from_value(ops).map_err(kube::Error::SerdeError)?;
    api.patch(
        &vm.name_any(),
        &PatchParams::default(),
        &Patch::Json::<()>(patch),
    )
    .await
}

pub fn error_policy(vm: Arc<VirtualMachine>, err: &Error, ctx: Arc<Context>) -> Action {
    tracing::warn!(vm = %vm.name_any(), error = %err, "reconcile error");
    ctx.metrics.reconcile_error("vm", err.kind());
    Action::requeue(Duration::from_secs(5))
}

/// The local files of every image the VM names, or why one is unusable.
pub(super) async fn resolve_images(
    vm: &VirtualMachine,
    ctx: &Context,
) -> Result<BTreeMap<String, LocalImage>, Problem> {
    let ns = vm.namespace().unwrap_or_default();
    let api: Api<VirtualMachineImage> = Api::namespaced(ctx.client.clone(), &ns);
    let mut wanted: Vec<(&str, Option<ImageFormat>)> = Vec::new();
    for d in &vm.spec.disks {
        if let Some(i) = &d.image {
            wanted.push((&i.name, None));
        }
    }
    if let Some(boot) = &vm.spec.boot {
        boot.kernel
            .iter()
            .for_each(|k| wanted.push((&k.name, Some(ImageFormat::Kernel))));
        boot.initrd
            .iter()
            .for_each(|i| wanted.push((&i.name, Some(ImageFormat::Initrd))));
    }
    let mut out = BTreeMap::new();
    for (name, need) in wanted {
        if out.contains_key(name) {
            continue;
        }
        let img = match api.get_opt(name).await {
            Ok(Some(img)) => img,
            Ok(None) => {
                return Err(Problem::retrying(
                    "ImageNotFound",
                    format!("VirtualMachineImage {ns}/{name} does not exist: create it"),
                ));
            }
            Err(e) => {
                return Err(Problem::retrying(
                    "ImageNotFound",
                    format!("cannot read VirtualMachineImage {ns}/{name}: {e}"),
                ));
            }
        };
        let disk_format = matches!(img.spec.format, ImageFormat::Qcow2 | ImageFormat::Raw);
        let fits = match need {
            Some(f) => img.spec.format == f,
            None => disk_format,
        };
        if !fits {
            return Err(Problem::needs_change(
                "ImageFormatMismatch",
                format!(
                    "VirtualMachineImage {name} has format {:?}, which cannot be used there",
                    img.spec.format
                ),
            ));
        }
        let ensured = ctx.images.ensure(&img).await;
        let found = match &ensured {
            Ok(local) => image_report::Found::Ready {
                size: tokio::fs::metadata(&local.path).await.ok().map(|m| m.len()),
            },
            Err(ImageError::Downloading(_)) => image_report::Found::Downloading {
                bytes: ctx.images.downloaded(&ns, &img.spec),
            },
            Err(e) => image_report::Found::Failed(e),
        };
        image_report::report(ctx, &img, found).await;
        let local = ensured.map_err(|e| {
            let message = format!("VirtualMachineImage {name}: {e}");
            if matches!(e, ImageError::Downloading(_)) {
                Problem::retrying(e.reason(), message).after(Duration::from_secs(2))
            } else if e.retryable() {
                Problem::retrying(e.reason(), message)
            } else {
                Problem::needs_change(e.reason(), message)
            }
        })?;
        out.insert(name.to_string(), local);
    }
    Ok(out)
}

/// A fresh read (not the cache): the VM still exists with this uid and is bound here.
async fn still_bound_here(vm: &VirtualMachine, ctx: &Context) -> Result<bool, Error> {
    let fresh = read_by_uid(
        ctx,
        &vm.namespace().unwrap_or_default(),
        &vm.name_any(),
        &vm.uid().unwrap_or_default(),
    )
    .await?;
    Ok(fresh.is_some_and(|f| f.metadata.deletion_timestamp.is_none() && bound_here(&f, ctx)))
}

/// The VM `ns/name` read from the API server (not the cache), if it is still the one with
/// `uid` (a VM created anew under the old name is another VM).
async fn read_by_uid(
    ctx: &Context,
    ns: &str,
    name: &str,
    uid: &str,
) -> Result<Option<VirtualMachine>, kube::Error> {
    let api: Api<VirtualMachine> = Api::namespaced(ctx.client.clone(), ns);
    Ok(api
        .get_opt(name)
        .await?
        .filter(|vm| vm.metadata.uid.as_deref() == Some(uid)))
}

fn bound_here(vm: &VirtualMachine, ctx: &Context) -> bool {
    vm.status.as_ref().and_then(|s| s.node_name.as_deref()) == Some(ctx.node.as_str())
}

#[derive(Clone, Copy)]
enum Side {
    Source,
    Target,
}

/// Whether a migration of VM `ns/name` from (or to) this node is unsettled: not finished,
/// or succeeded with the binding not yet moved by the controller.
async fn migrating(ctx: &Context, ns: &str, name: &str, side: Side) -> Result<bool, Error> {
    let api: Api<crate::api::VirtualMachineMigration> = Api::namespaced(ctx.client.clone(), ns);
    Ok(api.list(&Default::default()).await?.items.iter().any(|m| {
        m.spec.vm_name == name
            && m.unsettled()
            && m.status.as_ref().is_some_and(|s| {
                let node = match side {
                    Side::Source => &s.source_node,
                    Side::Target => &s.target_node,
                };
                node.as_deref() == Some(ctx.node.as_str())
            })
    }))
}

/// Brings the domain to what the spec asks, and writes the status: a step that cannot be
/// done shows on the VM as a Problem.
async fn apply(vm: &VirtualMachine, ctx: &Context, read: Freshness) -> Result<Action, Error> {
    match apply_steps(vm, ctx, read).await? {
        Ok(action) => Ok(action),
        Err(problem) => {
            tracing::warn!(vm = %vm.name_any(), reason = problem.reason, message = %problem.message, "VM cannot run");
            report_problem(vm, ctx, problem).await
        }
    }
}

/// Ok(Err(problem)) when a step failed in a way the VM's status must show; Err(error)
/// for failures of the agent's own connections (logged and retried). Observes, asks
/// [`plan::plan`] what to do, does it, and reports what is then true.
async fn apply_steps(
    vm: &VirtualMachine,
    ctx: &Context,
    read: Freshness,
) -> Result<Result<Action, Problem>, Error> {
    let uid = vm.uid().unwrap_or_default();
    // Held either way (see plan::plan): not worth resolving images for.
    let busy = ctx
        .storage_busy
        .lock()
        .expect("not poisoned")
        .contains(&uid);
    if ctx.fenced.load(std::sync::atomic::Ordering::SeqCst) || ctx.migrations.holds_vm(&uid) || busy
    {
        return Ok(Ok(Action::requeue(plan::HOLD)));
    }
    let spec = match observe_spec(vm, ctx).await {
        Ok(s) => s,
        Err(p) => return Ok(Err(p)),
    };
    let (xml, hash) = render::finish(spec.domain)?;
    let mut existing = ctx.lv.lookup(&uid).await?;
    let status = vm.status.clone().unwrap_or_default();
    let ran_before = status.start_time.is_some();
    let state = existing.as_ref().map(|d| d.state);
    let defined_hash = existing
        .as_ref()
        .and_then(|d| d.owner.as_ref())
        .map(|o| o.hash.clone());
    let migration_unsettled = plan::needs_migration_check(state, ran_before)
        && migrating(
            ctx,
            &vm.namespace().unwrap_or_default(),
            &vm.name_any(),
            Side::Source,
        )
        .await?;
    // Starts happen under the gate: fencing takes it exclusively, so no start slips in
    // between fencing's flag and its destroys.
    let gate = ctx.fence_gate.read().await;
    let mut rt = Taken::new(&ctx.runtime, &uid);
    let annotations = vm.annotations();
    let o = plan::Observation {
        now: Instant::now(),
        fenced: ctx.fenced.load(std::sync::atomic::Ordering::SeqCst),
        copying_out: ctx.migrations.holds_vm(&uid),
        fresh: read == Freshness::Fresh,
        strategy: vm.spec.run_strategy.unwrap_or_default(),
        power_on: annotations.get(POWER_ANNOTATION).map(String::as_str) == Some("on"),
        restart_token: annotations.get(RESTART_ANNOTATION).map(String::as_str),
        last_restart_request: status.last_restart_request.as_deref(),
        evicted_here: annotations.get(crate::api::EVICT_ANNOTATION) == Some(&ctx.node),
        ran_before,
        phase: status.phase,
        grace: grace_period(vm),
        domain: state,
        defined_hash: defined_hash.as_deref(),
        hash: &hash,
        migration_unsettled,
        default_requeue: super::REQUEUE,
    };
    let acts = match plan::plan(&o, &rt) {
        plan::Plan::Hold { requeue, why } => {
            tracing::info!(vm = %vm.name_any(), why, "not acting on the domain");
            return Ok(Ok(Action::requeue(requeue)));
        }
        plan::Plan::Act(acts) => acts,
    };
    let started_now = match execute(vm, ctx, &acts.steps, xml, &spec.sources, &mut rt).await? {
        Ok(started_now) => started_now,
        Err(Halt::NotBound) => return Ok(Ok(Action::await_change())),
        Err(Halt::Problem(p)) => return Ok(Err(p)),
    };
    if acts
        .steps
        .iter()
        .any(|s| matches!(s, Step::Define | Step::Start | Step::Destroy))
    {
        existing = ctx.lv.lookup(&uid).await?;
    }
    *rt = acts.runtime.clone();
    drop(rt);
    drop(gate);
    if let Some(failure) = &acts.start_failed {
        return Ok(Err(start_failed(failure)));
    }

    let done = Done {
        existing,
        started_now,
        ran_before,
        runtime: acts.runtime.clone(),
        hardware: spec.hardware,
    };
    report_done(vm, ctx, &o, &acts, &hash, done).await.map(Ok)
}

/// Why the steps stopped before the last.
enum Halt {
    /// A fresh read shows the VM bound elsewhere or gone: its next event brings the news.
    NotBound,
    Problem(Problem),
}

/// Runs the plan's steps in order, stopping at the first that fails; whether the domain
/// was started. A refused start goes into the runtime record (the backoff).
async fn execute(
    vm: &VirtualMachine,
    ctx: &Context,
    steps: &[Step],
    xml: String,
    sources: &render::Sources,
    rt: &mut VmRuntime,
) -> Result<Result<bool, Halt>, Error> {
    let uid = vm.uid().unwrap_or_default();
    let mut xml = Some(xml);
    let mut started_now = false;
    for step in steps {
        match step {
            Step::ConfirmBound => {
                // The cache may be stale (a watch that just came back after a cut): ask
                // the API server whether the VM is still ours before acting on it.
                if !still_bound_here(vm, ctx).await? {
                    tracing::warn!(vm = %vm.name_any(), ?steps, "not acting: no longer bound to this node");
                    return Ok(Err(Halt::NotBound));
                }
            }
            Step::Prepare => {
                let offline = steps.contains(&Step::Start);
                if let Err(p) = prepare_files(vm, ctx, sources, offline).await {
                    return Ok(Err(Halt::Problem(p)));
                }
            }
            Step::Define => {
                if let Err(e) = ctx.lv.define(xml.take().unwrap_or_default()).await {
                    return Ok(Err(Halt::Problem(Problem::retrying(
                        "DefineFailed",
                        format!("libvirt refused to define the domain: {e}"),
                    ))));
                }
            }
            Step::Start => {
                tracing::info!(vm = %vm.name_any(), uid, "starting domain");
                if let Err(e) = ctx.lv.start(&uid).await {
                    let (next, failure) = plan::start_refused(rt, Instant::now(), e.to_string());
                    *rt = next;
                    return Ok(Err(Halt::Problem(start_failed(&failure))));
                }
                started_now = true;
            }
            Step::Shutdown => ctx.lv.shutdown(&uid).await?,
            Step::Destroy => {
                tracing::info!(vm = %vm.name_any(), "ACPI shutdown timed out: destroying");
                ctx.lv.destroy(&uid).await?;
            }
        }
    }
    Ok(Ok(started_now))
}

/// What the executed steps left: the domain as libvirt now shows it, and the runtime.
struct Done {
    existing: Option<DomainInfo>,
    started_now: bool,
    ran_before: bool,
    runtime: VmRuntime,
    hardware: Option<render::Hardware>,
}

/// Writes the status that says what is now true, and when to look again.
async fn report_done(
    vm: &VirtualMachine,
    ctx: &Context,
    o: &plan::Observation<'_>,
    acts: &plan::Acts,
    hash: &str,
    done: Done,
) -> Result<Action, Error> {
    let uid = vm.uid().unwrap_or_default();
    let Done {
        existing,
        started_now,
        ran_before,
        runtime,
        hardware,
    } = done;
    let final_state = existing.as_ref().map(|d| d.state);
    let now_running = final_state.is_some_and(RunState::active);
    let restart_required = now_running
        && existing
            .as_ref()
            .and_then(|d| d.owner.as_ref())
            .map(|o| o.hash.as_str())
            != Some(hash);
    let addresses = if now_running {
        let agent = vm.spec.guest_agent == Some(true);
        ctx.lv.addresses(&uid, agent).await.unwrap_or_default()
    } else {
        Vec::new()
    };
    let readiness = super::probes::ensure(ctx, vm, now_running, started_now);
    let address_poll = match now_running && learns_addresses(vm) {
        false => None,
        true if address_learnable_missing(vm, &addresses) => Some(super::probes::ADDRESS_POLL),
        true => Some(super::probes::ADDRESS_REFRESH),
    };
    let observed = Observed {
        defined: existing.is_some(),
        state: final_state,
        want_running: acts.want_running,
        stopped_by_us: runtime.stopped_by_us,
        shutting_down: runtime.shutdown_since.is_some(),
        restart_required,
        backing_off: acts.backing_off,
        failures: runtime.failures,
        restarted: started_now && ran_before,
        started_now,
        addresses,
        readiness,
        hardware,
        restart_handled: plan::restart_handled(o, acts.restart_pending, started_now, now_running)
            .map(str::to_string),
    };
    super::status::write(vm, ctx, observed, None).await?;
    let mut requeue = acts.requeue;
    if final_state == Some(RunState::ShuttingDown) {
        requeue = requeue.min(plan::SHUTDOWN_POLL);
    }
    if let Some(poll) = address_poll {
        requeue = requeue.min(poll);
    }
    Ok(Action::requeue(requeue))
}

/// What the spec resolves to on this node: its class, its images' local files, the
/// domain it renders to, and the hardware it asks for.
struct SpecOnNode {
    sources: render::Sources,
    domain: super::domain::Domain,
    hardware: Option<render::Hardware>,
}

async fn observe_spec(vm: &VirtualMachine, ctx: &Context) -> Result<SpecOnNode, Problem> {
    let class = match &vm.spec.class_ref {
        Some(r) => match ctx
            .classes
            .get(&kube::runtime::reflector::ObjectRef::new(&r.name))
        {
            Some(c) => Some(c.spec.clone()),
            None => {
                return Err(Problem::retrying(
                    "ClassNotFound",
                    format!("VirtualMachineClass {} does not exist: create it", r.name),
                ));
            }
        },
        None => None,
    };
    let sources = render::Sources {
        images: resolve_images(vm, ctx).await?,
        volumes: super::volumes::resolve(vm, ctx).await?,
    };
    let domain = render::render(vm, class.as_ref(), &sources, &ctx.facts)
        .map_err(|e| Problem::needs_change("InvalidSpec", e.to_string()))?;
    let hardware = render::Hardware::resolve(&vm.spec, class.as_ref()).ok();
    Ok(SpecOnNode {
        sources,
        domain,
        hardware,
    })
}

/// The VM's files: made before a (re)definition, so that a defined domain never points
/// at a disk that does not exist, and before every start, so that the seed follows the
/// spec at every boot.
pub(super) async fn prepare_files(
    vm: &VirtualMachine,
    ctx: &Context,
    sources: &render::Sources,
    offline: bool,
) -> Result<(), Problem> {
    let uid = vm.uid().unwrap_or_default();
    let files = render::disk_files(&vm.spec, &uid, &ctx.facts.state_dir, sources)
        .map_err(|e| Problem::needs_change("InvalidSpec", e.to_string()))?;
    let prepared = disks::prepare(
        &super::layout::vm_dir(&ctx.facts.state_dir, &uid),
        &files,
        &uid,
        &vm.name_any(),
        offline,
    )
    .await;
    // Each volume says how it stands, made or not.
    let ns = vm.namespace().unwrap_or_default();
    for v in sources.volumes.values() {
        let outcome = match &prepared {
            Err(e) => Err(e.to_string()),
            Ok(()) => super::volumes::sizes(&v.path).await,
        };
        if let Err(e) = super::volumes::report(ctx, &ns, &v.name, outcome).await {
            tracing::warn!(volume = %v.name, error = %e, "volume status not written");
        }
    }
    prepared.map_err(|e| disk_problem(&e))
}

fn grace_period(vm: &VirtualMachine) -> Duration {
    Duration::from_secs(
        vm.spec
            .termination_grace_period_seconds
            .unwrap_or(30)
            .max(0) as u64,
    )
}

/// A start libvirt refused; tried again after the crash backoff. The message counts the
/// failures, so it changes (and is written) once per attempt, not per reconcile.
fn start_failed(f: &plan::StartFailure) -> Problem {
    let (reason, what) = match start_refusal(&f.error) {
        Refusal::DiskLocked => (
            "DiskLocked",
            "a writable disk is held by another QEMU (the lock manager or QEMU's own lock \
             refused it: another copy of this VM, on another node, or another VM naming the \
             same file)",
        ),
        Refusal::Other => ("StartFailed", "libvirt could not start the domain"),
    };
    Problem::retrying(
        reason,
        format!(
            "{what} ({} in a row): {}; the agent retries {} s after the failure",
            f.failures,
            f.error,
            plan::backoff(f.failures).as_secs()
        ),
    )
    .after(f.remaining)
}

#[derive(Debug, PartialEq, Eq)]
enum Refusal {
    DiskLocked,
    Other,
}

/// Pure: why libvirt refused a start, from its message: virtlockd's lease refusal, or
/// QEMU's own image lock.
fn start_refusal(error: &str) -> Refusal {
    const LOCKED: [&str; 3] = [
        "Failed to acquire lock",
        "is already locked",
        "Failed to get \"write\" lock",
    ];
    if LOCKED.iter().any(|m| error.contains(m)) {
        Refusal::DiskLocked
    } else {
        Refusal::Other
    }
}

/// Disk preparation failures: a missing program is the node's to fix, anything else
/// (disk full, permissions) too; the message carries qemu-img's own words.
fn disk_problem(e: &disks::DiskError) -> Problem {
    let reason = match e {
        disks::DiskError::Tool(super::tools::ToolError::Missing(_)) => "ToolMissing",
        _ => "DiskPreparationFailed",
    };
    Problem::retrying(reason, format!("preparing disks: {e}"))
}

async fn report_problem(
    vm: &VirtualMachine,
    ctx: &Context,
    problem: Problem,
) -> Result<Action, Error> {
    let uid = vm.uid().unwrap_or_default();
    let existing = ctx.lv.lookup(&uid).await?;
    let observed = Observed {
        defined: existing.is_some(),
        state: existing.map(|d| d.state),
        ..Default::default()
    };
    let requeue = problem.requeue();
    super::status::write(vm, ctx, observed, Some(problem)).await?;
    Ok(Action::requeue(requeue))
}

/// Deletion: stop the guest (gracefully, then by force), undefine it, remove its files.
async fn cleanup(vm: &VirtualMachine, ctx: &Context) -> Result<Action, Error> {
    // The finalizer helper drops the finalizer as soon as this returns Ok, so everything
    // happens here, including the wait for the guest to power off.
    let uid = vm.uid().unwrap_or_default();
    if let Some(d) = ctx.lv.lookup(&uid).await? {
        let running = d.state.active();
        if running {
            ctx.runtime
                .lock()
                .expect("not poisoned")
                .entry(uid.clone())
                .or_default()
                .stopped_by_us = true;
            let observed = Observed {
                defined: true,
                state: Some(RunState::ShuttingDown),
                ..Default::default()
            };
            super::status::write(vm, ctx, observed, None).await?;
            stop_gracefully(ctx, &uid, grace_period(vm)).await?;
        }
        ctx.lv.undefine(&uid).await?;
    }
    disks::remove(&super::layout::vm_dir(&ctx.facts.state_dir, &uid)).await?;
    ctx.runtime.lock().expect("not poisoned").remove(&uid);
    ctx.newest.lock().expect("not poisoned").remove(&uid);
    tracing::info!(vm = %vm.name_any(), uid, "domain and disks removed");
    Ok(Action::await_change())
}

/// ACPI shutdown, then destroy once `grace` has passed without the guest powering off.
async fn stop_gracefully(ctx: &Context, uid: &str, grace: Duration) -> Result<(), Error> {
    let deadline = Instant::now() + grace;
    ctx.lv.shutdown(uid).await?;
    while Instant::now() < deadline {
        match ctx.lv.lookup(uid).await? {
            Some(d) if d.state.active() => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            _ => return Ok(()),
        }
    }
    tracing::info!(uid, "ACPI shutdown timed out: destroying");
    ctx.lv.destroy(uid).await?;
    Ok(())
}

/// What a fresh read (by namespace/name, compared by uid) says about a domain's VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fresh {
    /// The read failed: nothing is confirmed.
    Unknown,
    /// No VirtualMachine with that uid exists (gone, or a new one under the old name).
    Gone,
    /// It exists and is bound to this node: the cache lags.
    BoundHere,
    /// It exists, unbound or bound to another node.
    Elsewhere,
}

/// What the sweep does with a domain of this node whose VM is not in the agent's cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sweep {
    Keep,
    /// Stop it (never two running copies) but keep its definition and files: they hold
    /// the VM's only copy of its local data while the VM exists.
    StopKeepFiles,
    /// Destroy, undefine and delete its files: its VM is confirmed gone.
    Remove,
}

/// Pure: the sweep's decision. Files go only when a fresh read confirms the VM is gone.
pub fn sweep_verdict(fresh: Fresh, running: bool, migration_target: bool) -> Sweep {
    match fresh {
        Fresh::Unknown | Fresh::BoundHere => Sweep::Keep,
        // A guest arriving by live migration is ours before the binding says so.
        _ if migration_target => Sweep::Keep,
        Fresh::Gone => Sweep::Remove,
        Fresh::Elsewhere if running => Sweep::StopKeepFiles,
        Fresh::Elsewhere => Sweep::Keep,
    }
}

async fn fresh_read(ctx: &Context, owner: &super::domain::VmMetadata) -> Fresh {
    match read_by_uid(ctx, &owner.namespace, &owner.name, &owner.uid).await {
        Err(_) => Fresh::Unknown,
        Ok(None) => Fresh::Gone,
        Ok(Some(vm)) if bound_here(&vm, ctx) => Fresh::BoundHere,
        Ok(Some(_)) => Fresh::Elsewhere,
    }
}

/// Looks after domains that carry this node's vmlet metadata but whose VM is not bound
/// here, once they have been so for the grace period (the VM store may lag behind): a VM
/// that still exists elsewhere only has its guest stopped here, and its files stay (they
/// may be the only copy of its disks); a VM confirmed gone by a fresh read loses its
/// domain and files.
pub async fn orphan_loop(ctx: Arc<Context>) {
    let _ = ctx.vms.wait_until_ready().await;
    let mut first_seen: std::collections::HashMap<String, Instant> = Default::default();
    let grace = Duration::from_secs(ctx.args.orphan_grace_seconds);
    loop {
        match ctx.lv.list().await {
            Ok(domains) => {
                let live: std::collections::HashSet<String> = ctx
                    .vms
                    .state()
                    .iter()
                    .filter_map(|vm| vm.metadata.uid.clone())
                    .collect();
                let mut orphans = std::collections::HashSet::new();
                for d in domains {
                    let Some(owner) = d.owner else { continue };
                    if owner.node != ctx.node || live.contains(&owner.uid) {
                        continue;
                    }
                    orphans.insert(d.uuid.clone());
                    let since = *first_seen
                        .entry(d.uuid.clone())
                        .or_insert_with(Instant::now);
                    if since.elapsed() < grace {
                        continue;
                    }
                    let fresh = fresh_read(&ctx, &owner).await;
                    let running = d.state.active();
                    // The migrations are listed only when they can change the verdict.
                    let target = sweep_verdict(fresh, running, false) != Sweep::Keep
                        && migrating(&ctx, &owner.namespace, &owner.name, Side::Target)
                            .await
                            .unwrap_or(true);
                    let vm = format!("{}/{}", owner.namespace, owner.name);
                    match sweep_verdict(fresh, running, target) {
                        Sweep::Keep => {}
                        Sweep::StopKeepFiles => {
                            tracing::warn!(domain = %d.name, %vm, "stopping a guest whose VM is bound elsewhere; its disks stay on this node until the VM is deleted");
                            ctx.runtime
                                .lock()
                                .expect("not poisoned")
                                .entry(owner.uid.clone())
                                .or_default()
                                .stopped_by_us = true;
                            let _ = ctx.lv.destroy(&d.uuid).await;
                        }
                        Sweep::Remove => {
                            tracing::warn!(domain = %d.name, %vm, "removing the domain and files of a deleted VM");
                            let _ = ctx.lv.destroy(&d.uuid).await;
                            if ctx.lv.undefine(&d.uuid).await.is_ok() {
                                let _ = disks::remove(&super::layout::vm_dir(
                                    &ctx.facts.state_dir,
                                    &owner.uid,
                                ))
                                .await;
                                ctx.metrics.orphan_removed();
                            }
                        }
                    }
                }
                first_seen.retain(|uuid, _| orphans.contains(uuid));
            }
            Err(e) => tracing::warn!(error = %e, "listing domains failed"),
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

/// The VM's interfaces whose addresses the node can learn: on a libvirt network or a
/// bridge (leases, neighbours), or any when the guest runs an agent. User networking
/// hides the guest behind QEMU.
fn learnable(vm: &VirtualMachine) -> impl Iterator<Item = &crate::api::vm::Network> {
    let agent = vm.spec.guest_agent == Some(true);
    vm.spec
        .networks
        .iter()
        .filter(move |n| agent || n.user.is_none())
}

fn learns_addresses(vm: &VirtualMachine) -> bool {
    learnable(vm).next().is_some()
}

/// Whether an interface that can learn an address (on a libvirt network or a bridge,
/// or any with the guest agent) has no usable one yet among `found` (a link-local one
/// comes first): the agent looks again soon.
fn address_learnable_missing(vm: &VirtualMachine, found: &[super::libvirt::Address]) -> bool {
    let uid = vm.uid().unwrap_or_default();
    learnable(vm).any(|n| {
        super::status::addresses_of(&super::layout::mac_of(&uid, n), found)
            .ips
            .is_empty()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lock_refusal_is_named_as_such() {
        for (error, want) in [
            (
                "resource busy: Lockspace resource '/pool/v.qcow2' is locked: Failed to acquire lock",
                Refusal::DiskLocked,
            ),
            (
                "Failed to acquire lock: File is already locked",
                Refusal::DiskLocked,
            ),
            (
                "qemu-system-x86_64: -blockdev ...: Failed to get \"write\" lock\nIs another process using the image [/x.qcow2]?",
                Refusal::DiskLocked,
            ),
            (
                "internal error: process exited while connecting to monitor",
                Refusal::Other,
            ),
        ] {
            assert_eq!(start_refusal(error), want, "{error}");
        }
    }

    #[test]
    fn the_sweep_deletes_files_only_for_vms_confirmed_gone() {
        use Fresh::*;
        use Sweep::*;
        // (fresh read, domain running, unfinished migration to here) -> verdict
        let table = [
            (Unknown, true, false, Keep),
            (Unknown, false, false, Keep),
            (BoundHere, true, false, Keep),
            (Gone, true, false, Remove),
            (Gone, false, false, Remove),
            (Gone, true, true, Keep),
            (Elsewhere, true, false, StopKeepFiles),
            (Elsewhere, false, false, Keep),
            (Elsewhere, true, true, Keep),
        ];
        for (fresh, running, target, want) in table {
            assert_eq!(
                sweep_verdict(fresh, running, target),
                want,
                "{fresh:?} running={running} target={target}"
            );
        }
    }
}
