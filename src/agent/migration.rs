//! VirtualMachineMigrations, the agents' half. The target prepares the VM's files (images,
//! disk overlays, seed) and says TargetReady; the source then live-migrates the domain with
//! libvirt (peer to peer, an explicit data URI, disks copied incrementally over the
//! backing images), moves the VM's binding to the target in one write, and reports the
//! outcome with libvirt's downtime. On any failure the VM keeps running on the source.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, ResourceExt};
use kube::runtime::controller::Action;
use quick_xml::events::{BytesStart, BytesText, Event};
use serde_json::json;

use super::libvirt::Guest;
use super::{Context, disks};
use crate::api::{
    Hypervisor, MIGRATION_FINALIZER, MigrationPhase, VirtualMachine, VirtualMachineMigration,
    VirtualMachineMigrationStatus, conditions,
};

/// Field managers: source and target write different parts of one status.
const SOURCE_MANAGER: &str = "vmlet-agent-migration-source";
const TARGET_MANAGER: &str = "vmlet-agent-migration-target";
/// The target's manager when it settles a migration its source left unfinished.
const SETTLE_MANAGER: &str = "vmlet-agent-migration-target-settle";
/// How long a guest that arrived runs on the target, its migration still Running, before
/// the target concludes the source will not finish it (its agent settles in seconds when
/// it runs at all).
pub const SOURCE_SILENCE: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes: {0}")]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Libvirt(#[from] super::libvirt::LibvirtError),
    #[error("{0}")]
    Other(String),
}

impl Error {
    /// The metric label of this error kind.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Libvirt(_) => "libvirt",
            Error::Other(_) => "other",
        }
    }
}

/// Path prefixes to change in the domain XML, and the node to name in its metadata.
pub struct Rewrite<'a> {
    pub prefixes: Vec<(String, String)>,
    pub node: &'a str,
}

impl Rewrite<'_> {
    fn path<'s>(&self, v: &'s str) -> Cow<'s, str> {
        for (from, to) in &self.prefixes {
            if let Some(rest) = v.strip_prefix(from.as_str())
                && (rest.is_empty() || rest.starts_with('/'))
            {
                return Cow::Owned(format!("{to}{rest}"));
            }
        }
        Cow::Borrowed(v)
    }
}

/// The destination's XML: the running domain's own (so the guest ABI stays the same),
/// with every attribute and text that is a path under the source's roots moved under the
/// target's, and vmlet's metadata naming the target node. Read and written by an XML
/// library; nothing is formatted into markup.
pub fn rewrite_xml(xml: &str, rw: &Rewrite) -> Result<String, quick_xml::Error> {
    let mut reader = quick_xml::Reader::from_str(xml);
    let mut writer = quick_xml::Writer::new(Vec::new());
    loop {
        let ev = reader.read_event()?;
        let start = |e: &BytesStart| -> Result<BytesStart<'static>, quick_xml::Error> {
            // vmlet's metadata element is `vmlet:vm`, a prefixed `vm`.
            let in_meta = e.local_name().as_ref() == b"vm" && e.name().as_ref() != b"vm";
            let name = String::from_utf8_lossy(e.name().as_ref()).into_owned();
            let mut out = BytesStart::new(name.clone());
            for a in e.attributes() {
                let a = a.map_err(quick_xml::Error::from)?;
                let key = String::from_utf8_lossy(a.key.as_ref()).into_owned();
                let value = a.unescape_value()?.into_owned();
                let value = if in_meta && key == "node" {
                    rw.node.to_string()
                } else {
                    rw.path(&value).into_owned()
                };
                out.push_attribute((key.as_str(), value.as_str()));
            }
            Ok(out)
        };
        match ev {
            Event::Eof => break,
            Event::Start(e) => writer.write_event(Event::Start(start(&e)?))?,
            Event::Empty(e) => writer.write_event(Event::Empty(start(&e)?))?,
            Event::Text(t) => {
                let text = t.decode().map_err(quick_xml::Error::from)?.into_owned();
                let moved = rw.path(text.trim());
                let out = if moved != text.trim() {
                    moved.into_owned()
                } else {
                    text
                };
                writer.write_event(Event::Text(BytesText::new(&out)))?;
            }
            other => writer.write_event(other)?,
        }
    }
    Ok(String::from_utf8(writer.into_inner()).expect("UTF-8 in, UTF-8 out"))
}

/// Copies in flight on this node, by migration uid: the VM's uid, to abort them. And, on
/// a target, since when a guest that arrived has run here while its migration stayed
/// Running (see [`target_settles`]).
#[derive(Default)]
pub struct InFlight(
    std::sync::Mutex<std::collections::HashMap<String, String>>,
    std::sync::Mutex<std::collections::HashMap<String, Instant>>,
);

impl InFlight {
    /// How long the guest of migration `uid` has been seen running here; forgets it when
    /// it is not.
    fn arrived_for(&self, uid: &str, running: bool) -> Duration {
        let mut seen = self.1.lock().expect("not poisoned");
        if !running {
            seen.remove(uid);
            return Duration::ZERO;
        }
        seen.entry(uid.to_string())
            .or_insert_with(Instant::now)
            .elapsed()
    }

    fn vm_of(&self, migration: &str) -> Option<String> {
        self.0.lock().expect("not poisoned").get(migration).cloned()
    }

    /// Whether a copy of this VM is running: its reconciles then leave the domain alone.
    pub fn holds_vm(&self, vm_uid: &str) -> bool {
        self.0
            .lock()
            .expect("not poisoned")
            .values()
            .any(|v| v == vm_uid)
    }
}

async fn patch_status(
    m: &VirtualMachineMigration,
    ctx: &Context,
    manager: &str,
    status: serde_json::Value,
) -> Result<(), kube::Error> {
    let api: Api<VirtualMachineMigration> =
        Api::namespaced(ctx.client.clone(), &m.namespace().unwrap_or_default());
    let patch = json!({
        "apiVersion": "vmlet.dev/v1alpha1",
        "kind": "VirtualMachineMigration",
        "status": status,
    });
    api.patch_status(
        &m.name_any(),
        &PatchParams::apply(manager).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

async fn release(m: &VirtualMachineMigration, ctx: &Context) -> Result<(), kube::Error> {
    let api: Api<VirtualMachineMigration> =
        Api::namespaced(ctx.client.clone(), &m.namespace().unwrap_or_default());
    crate::patch::remove_finalizer(&api, m, MIGRATION_FINALIZER).await
}

pub async fn reconcile(
    m: Arc<VirtualMachineMigration>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let Some(status) = m.status.clone() else {
        return Ok(Action::await_change());
    };
    let me = ctx.node.as_str();
    let uid = m.uid().unwrap_or_default();
    let phase = status.phase.unwrap_or(MigrationPhase::Pending);
    let is_source = status.source_node.as_deref() == Some(me);
    let is_target = status.target_node.as_deref() == Some(me);
    if phase == MigrationPhase::Running && is_source {
        return match ctx.migrations.vm_of(&uid) {
            Some(vm_uid) if m.metadata.deletion_timestamp.is_some() => {
                // The copy's own task reports Failed/Aborted and lets go of the object.
                tracing::warn!(migration = %m.name_any(), "cancelled: aborting the copy");
                ctx.lv.abort_job(&vm_uid).await?;
                Ok(Action::requeue(Duration::from_secs(5)))
            }
            // Its task finishes it; a look now and then in case that task died with it.
            Some(_) => Ok(Action::requeue(Duration::from_secs(30))),
            // Not copying here, yet Running: this agent restarted (or its task died)
            // during the copy. libvirt went on without it; ask where the guest is.
            None => settle_interrupted(&m, &ctx).await,
        };
    }
    if phase == MigrationPhase::Running && is_target {
        return watch_arrival(&m, &ctx).await;
    }
    if phase == MigrationPhase::Succeeded && is_source {
        return clean_departed(&m, &ctx).await;
    }
    if m.metadata.deletion_timestamp.is_some() || phase != MigrationPhase::Scheduling {
        return Ok(Action::await_change());
    }
    let ready = conditions::is_true(&status.conditions, conditions::Type::TargetReady);
    if is_target && !ready {
        prepare_target(&m, &ctx).await?;
    } else if is_source && ready && ctx.migrations.vm_of(&uid).is_none() {
        start_copy(m, ctx).await?;
    }
    Ok(Action::await_change())
}

pub fn error_policy(m: Arc<VirtualMachineMigration>, err: &Error, ctx: Arc<Context>) -> Action {
    tracing::warn!(migration = %m.name_any(), error = %err, "migration step failed");
    ctx.metrics.reconcile_error("migration", err.kind());
    Action::requeue(Duration::from_secs(3))
}

async fn get_vm(m: &VirtualMachineMigration, ctx: &Context) -> Result<VirtualMachine, Error> {
    let api: Api<VirtualMachine> =
        Api::namespaced(ctx.client.clone(), &m.namespace().unwrap_or_default());
    api.get_opt(&m.spec.vm_name)
        .await?
        .ok_or_else(|| Error::Other(format!("VirtualMachine {} is gone", m.spec.vm_name)))
}

/// The target's part: the images and the VM's own files (empty overlays over the same
/// backing images, the seed) where its domain will look for them.
async fn prepare_target(m: &VirtualMachineMigration, ctx: &Context) -> Result<(), Error> {
    let vm = get_vm(m, ctx).await?;
    let sources = super::render::Sources {
        images: super::reconcile::resolve_images(&vm, ctx)
            .await
            .map_err(|p| Error::Other(p.message))?,
        // Only pooled volumes migrate (the controller refuses local ones): their files
        // are already here.
        volumes: super::volumes::resolve(&vm, ctx)
            .await
            .map_err(|p| Error::Other(p.message))?,
    };
    super::reconcile::prepare_files(&vm, ctx, &sources, false)
        .await
        .map_err(|p| Error::Other(p.message))?;
    let old = m.status.clone().unwrap_or_default();
    let cond = conditions::new(
        &old.conditions,
        conditions::Type::TargetReady,
        true,
        "Prepared",
        format!("{} holds the VM's images and files", ctx.node),
        m.metadata.generation,
        Time(Timestamp::now()),
    );
    patch_status(m, ctx, TARGET_MANAGER, json!({"conditions": [cond]})).await?;
    tracing::info!(migration = %m.name_any(), vm = %vm.name_any(), "target prepared");
    Ok(())
}

/// The source's part, started here and finished in a task of its own so that a deletion
/// of the migration can reach [`reconcile`] and abort it meanwhile.
async fn start_copy(m: Arc<VirtualMachineMigration>, ctx: Arc<Context>) -> Result<(), Error> {
    let vm = get_vm(&m, &ctx).await?;
    let vm_uid = vm.uid().unwrap_or_default();
    let status = m.status.clone().unwrap_or_default();
    let target = status.target_node.clone().unwrap_or_default();
    let hvs: Api<Hypervisor> = Api::all(ctx.client.clone());
    let target_hv = hvs
        .get_opt(&target)
        .await?
        .and_then(|h| h.status)
        .unwrap_or_default();
    let dest_uri = target_hv
        .migration_uri
        .clone()
        .ok_or_else(|| Error::Other(format!("{target} has no migration URI")))?;
    // The guest goes only to an address kubelet vouches for as the target's.
    if let Err(why) = target_endpoint(&ctx, &target, &dest_uri).await? {
        tracing::warn!(migration = %m.name_any(), %why, "refusing the target's migration URI");
        let failed = json!({"phase": MigrationPhase::Failed, "reason": "UntrustedTarget",
            "message": format!("the VM keeps running on {}: {why}", ctx.node),
            "completionTime": Time(Timestamp::now())});
        patch_status(&m, &ctx, SOURCE_MANAGER, failed).await?;
        release(&m, &ctx).await?;
        return Ok(());
    }
    let host = reqwest::Url::parse(&dest_uri)
        .ok()
        .and_then(|u| u.host_str().map(str::to_string))
        .ok_or_else(|| Error::Other(format!("no host in {dest_uri}")))?;
    let rw = Rewrite {
        prefixes: [
            (
                ctx.facts.state_dir.display().to_string(),
                target_hv.state_dir.clone(),
            ),
            (
                ctx.args.image_root.display().to_string(),
                target_hv.image_root.clone(),
            ),
        ]
        .into_iter()
        .filter_map(|(from, to)| Some((from, to?)))
        // A pool may be mounted elsewhere on the target.
        .chain(ctx.pools.iter().filter_map(|(name, path)| {
            let there = target_hv.storage_pools.iter().find(|p| p.name == *name)?;
            Some((path.display().to_string(), there.path.clone()))
        }))
        .collect(),
        node: &target,
    };
    let xml = ctx.lv.migratable_xml(&vm_uid).await?;
    let dest_xml = rewrite_xml(&xml, &rw).map_err(|e| Error::Other(e.to_string()))?;
    let (copy_disks, shared) = disks_to_copy(&xml, ctx.pools.values().map(|p| p.as_path()))
        .map_err(|e| Error::Other(e.to_string()))?;
    let started = Time(Timestamp::now());
    patch_status(
        &m,
        &ctx,
        SOURCE_MANAGER,
        json!({"phase": MigrationPhase::Running, "reason": "Copying", "message": format!("copying to {target}"), "startTime": started}),
    )
    .await?;
    let mig_uid = m.uid().unwrap_or_default();
    ctx.migrations
        .0
        .lock()
        .expect("not poisoned")
        .insert(mig_uid.clone(), vm_uid.clone());
    ctx.metrics.migration("started");
    if let Err(e) = super::status::set_phase(&vm, &ctx, crate::api::vm::Phase::Migrating).await {
        tracing::warn!(vm = %vm.name_any(), error = %e, "could not say the VM is migrating");
    }
    tracing::info!(migration = %m.name_any(), vm = %vm.name_any(), %target, "live migration starting");
    tokio::spawn(async move {
        let t = Instant::now();
        let data_uri = format!("tcp://{host}");
        let res = ctx
            .lv
            .migrate(
                &vm_uid,
                &dest_uri,
                &data_uri,
                dest_xml,
                ctx.args.migration_tls,
                copy_disks,
                shared,
            )
            .await;
        let outcome = finish(&m, &ctx, &vm, &target, res, t, started).await;
        ctx.migrations
            .0
            .lock()
            .expect("not poisoned")
            .remove(&mig_uid);
        if let Err(e) = outcome {
            tracing::error!(migration = %m.name_any(), error = %e, "finishing the migration failed");
        }
    });
    Ok(())
}

async fn finish(
    m: &VirtualMachineMigration,
    ctx: &Context,
    vm: &VirtualMachine,
    target: &str,
    res: Result<(), super::libvirt::LibvirtError>,
    t: Instant,
    started: Time,
) -> Result<(), Error> {
    let vm_uid = vm.uid().unwrap_or_default();
    let took = t.elapsed();
    let outcome = match res {
        Ok(()) => {
            let (downtime, bytes) = ctx.lv.completed_job(&vm_uid).await.unwrap_or_default();
            ctx.metrics
                .migration_done(true, took, downtime.map(|d| d as f64 / 1000.0));
            tracing::info!(migration = %m.name_any(), %target, took_s = took.as_secs_f64(), ?downtime, "live migration succeeded");
            Outcome::Succeeded {
                message: format!(
                    "moved to {target} in {:.2} s{}",
                    took.as_secs_f64(),
                    downtime
                        .map(|d| format!(", guest paused {d} ms"))
                        .unwrap_or_default()
                ),
                downtime,
                bytes,
                stop_source: false,
            }
        }
        Err(e) => {
            let cancelled = m.metadata.deletion_timestamp.is_some()
                || Api::<VirtualMachineMigration>::namespaced(
                    ctx.client.clone(),
                    &m.namespace().unwrap_or_default(),
                )
                .get_opt(&m.name_any())
                .await
                .ok()
                .flatten()
                .is_none_or(|f| f.metadata.deletion_timestamp.is_some());
            ctx.metrics.migration_done(false, took, None);
            tracing::warn!(migration = %m.name_any(), error = %e, "live migration failed");
            Outcome::Failed {
                reason: if cancelled {
                    "Aborted"
                } else {
                    "MigrationFailed"
                },
                message: format!("the VM keeps running on {}: {e}", ctx.node),
                resume_source: false,
            }
        }
    };
    conclude(m, ctx, vm, outcome, Some(started)).await
}

/// How a migration ended, and what the source still has to do about it.
enum Outcome {
    Succeeded {
        message: String,
        downtime: Option<u64>,
        bytes: Option<u64>,
        /// The source still holds a paused copy (libvirt's last step did not run).
        stop_source: bool,
    },
    Failed {
        reason: &'static str,
        message: String,
        /// The source's copy is paused for a switch-over that will not come.
        resume_source: bool,
    },
}

/// The source's last steps, the same after a copy it watched and after one it settled
/// on restart: the outcome is written. On success the controller (the binding's one
/// writer) moves the binding to the target and then lets go of the migration's
/// finalizer; until then this node holds the VM (see `Migration::unsettled`), and once
/// it has, [`clean_departed`] removes the source's definition and files. A failed
/// migration is let go here.
async fn conclude(
    m: &VirtualMachineMigration,
    ctx: &Context,
    vm: &VirtualMachine,
    outcome: Outcome,
    started: Option<Time>,
) -> Result<(), Error> {
    let vm_uid = vm.uid().unwrap_or_default();
    let mut status = VirtualMachineMigrationStatus {
        start_time: started,
        completion_time: Some(Time(Timestamp::now())),
        ..Default::default()
    };
    match outcome {
        Outcome::Succeeded {
            message,
            downtime,
            bytes,
            stop_source,
        } => {
            if stop_source {
                ctx.lv.destroy(&vm_uid).await?;
            }
            status.phase = Some(MigrationPhase::Succeeded);
            status.reason = Some("Migrated".into());
            status.message = Some(message);
            status.downtime_milliseconds = downtime.map(|d| d as i64);
            status.data_transferred_bytes = bytes.map(|b| b as i64);
        }
        Outcome::Failed {
            reason,
            message,
            resume_source,
        } => {
            if resume_source {
                ctx.lv.resume(&vm_uid).await?;
            }
            status.phase = Some(MigrationPhase::Failed);
            status.reason = Some(reason.into());
            status.message = Some(message);
        }
    }
    let succeeded = status.phase == Some(MigrationPhase::Succeeded);
    let value = serde_json::to_value(&status).map_err(|e| Error::Other(e.to_string()))?;
    match patch_status(m, ctx, SOURCE_MANAGER, value).await {
        Ok(()) | Err(kube::Error::Api(_)) => {}
        Err(e) => return Err(e.into()),
    }
    if !succeeded {
        release(m, ctx).await?;
    }
    Ok(())
}

/// Pure: the target devices of the disks a migration copies (every writable disk except
/// those in a storage pool: the target mounts the same files), and whether any writable
/// disk stays in place for that reason.
pub fn disks_to_copy<'a>(
    xml: &str,
    pools: impl Iterator<Item = &'a std::path::Path> + Clone,
) -> Result<(Vec<String>, bool), quick_xml::DeError> {
    let (copied, pooled): (Vec<_>, Vec<_>) = super::domain::disks_in(xml)?
        .into_iter()
        .filter(|d| d.device == "disk" && !d.readonly)
        .partition(|d| {
            d.file.as_deref().is_none_or(|f| {
                let file = std::path::Path::new(f);
                !pools.clone().any(|p| file.starts_with(p))
            })
        });
    Ok((
        copied.into_iter().map(|d| d.dev).collect(),
        !pooled.is_empty(),
    ))
}

/// What to do with a migration left Running by a source agent that stopped watching it.
#[derive(Debug, PartialEq, Eq)]
pub enum Settle {
    /// libvirt has not finished, or cannot be asked: look again later.
    Wait(&'static str),
    /// The guest runs on the target (or its definition is there: libvirt persists it on
    /// the destination only once the copy is done).
    Succeeded { stop_source: bool },
    /// The guest is on the source (or nowhere): the VM stays bound there.
    Failed {
        message: &'static str,
        resume_source: bool,
    },
}

/// Settles an interrupted migration from what the two libvirts hold (None: could not ask)
/// and the VM's binding. Pure; the table is in the tests.
pub fn settle(bound_to_target: bool, src: Option<Guest>, dst: Option<Guest>) -> Settle {
    use Guest::*;
    let live = |g: Option<Guest>| matches!(g, Some(Active));
    match (src, dst) {
        (None, _) => Settle::Wait("this node's libvirt cannot be asked"),
        (Some(Migrating), _) | (_, Some(Migrating | PausedForMigration)) => {
            Settle::Wait("libvirt is still copying the guest")
        }
        // Never made by libvirt's pre-copy migration: not ours to pick one.
        _ if live(src) && live(dst) => Settle::Wait("the guest runs on both nodes"),
        // The rebind is written only after libvirt reported success.
        _ if bound_to_target => Settle::Succeeded {
            stop_source: matches!(src, Some(Active | PausedForMigration)),
        },
        (Some(Active), _) => Settle::Failed {
            message: "libvirt ended the copy with the guest running on the source",
            resume_source: false,
        },
        (Some(s), Some(Active | Stopped)) => Settle::Succeeded {
            stop_source: s == PausedForMigration,
        },
        (Some(MigratedAway), _) => Settle::Succeeded { stop_source: false },
        (Some(_), None) => Settle::Wait("the target's libvirt cannot be asked"),
        (Some(PausedForMigration), Some(_)) => Settle::Failed {
            message: "the target never took the guest; it resumes on the source",
            resume_source: true,
        },
        (Some(Absent | Stopped), Some(Absent | MigratedAway)) => Settle::Failed {
            message: "the guest runs on neither node; it starts again on the source as its runStrategy says",
            resume_source: false,
        },
    }
}

/// Whether the target settles a migration by itself: the guest it received has run
/// here, unpaused, for [`SOURCE_SILENCE`] while nobody moved the binding. libvirt
/// resumes an arriving guest only after the copy is complete, so it runs here and only
/// here; the source (its node lost, its agent gone) did not finish the migration.
pub fn target_settles(here: Guest, running_for: Duration) -> bool {
    here == Guest::Active && running_for >= SOURCE_SILENCE
}

/// The target's look at a Running migration: when [`target_settles`], the migration ends
/// Succeeded, and the controller moves the binding here (the source's leftovers stay
/// until its agent returns; see [`clean_departed`]).
async fn watch_arrival(m: &VirtualMachineMigration, ctx: &Context) -> Result<Action, Error> {
    let uid = m.uid().unwrap_or_default();
    let Ok(vm) = get_vm(m, ctx).await else {
        return Ok(Action::requeue(Duration::from_secs(10)));
    };
    let vm_uid = vm.uid().unwrap_or_default();
    let here = ctx.lv.guest(&vm_uid).await?;
    let running_for = ctx.migrations.arrived_for(&uid, here == Guest::Active);
    if !target_settles(here, running_for) {
        return Ok(Action::requeue(Duration::from_secs(5)));
    }
    // A fresh read: the source may have finished it a moment ago.
    let api: Api<VirtualMachineMigration> =
        Api::namespaced(ctx.client.clone(), &m.namespace().unwrap_or_default());
    let fresh = api.get(&m.name_any()).await?;
    if fresh.status.as_ref().and_then(|s| s.phase) != Some(MigrationPhase::Running) {
        return Ok(Action::await_change());
    }
    tracing::warn!(migration = %m.name_any(), vm = %vm.name_any(), running_for_s = running_for.as_secs(), "the guest runs here and the source has not finished its migration: settling it here");
    let done = json!({"phase": MigrationPhase::Succeeded, "reason": "Migrated",
        "message": format!("the guest runs on {}; the source did not finish the migration, so its target settled it after {} s", ctx.node, running_for.as_secs()),
        "completionTime": Time(Timestamp::now())});
    patch_status(m, ctx, SETTLE_MANAGER, done).await?;
    ctx.metrics.migration("settled-by-target");
    Ok(Action::await_change())
}

/// A source back after its target settled the migration: the definition libvirt shut
/// off here and the files it ran from are stale copies of what the target has; they go
/// once a fresh read shows the VM bound elsewhere.
async fn clean_departed(m: &VirtualMachineMigration, ctx: &Context) -> Result<Action, Error> {
    let Ok(vm) = get_vm(m, ctx).await else {
        // The VM's deletion (or the orphan sweep) cleans up.
        return Ok(Action::await_change());
    };
    let vm_uid = vm.uid().unwrap_or_default();
    let bound_here =
        vm.status.as_ref().and_then(|s| s.node_name.as_deref()) == Some(ctx.node.as_str());
    let left = ctx.lv.lookup(&vm_uid).await?;
    if bound_here || left.as_ref().is_none_or(|d| d.state.active()) {
        return Ok(Action::await_change());
    }
    tracing::info!(migration = %m.name_any(), vm = %vm.name_any(), "removing the definition and files a settled migration left here");
    forget_departed(ctx, &vm_uid).await?;
    Ok(Action::await_change())
}

/// Removes what this node keeps of a VM that migrated away: its shut-off definition, its
/// files (stale copies of the target's) and its runtime record. Each step is tried; the
/// first failure is returned.
async fn forget_departed(ctx: &Context, vm_uid: &str) -> Result<(), Error> {
    let undefined = ctx.lv.undefine(vm_uid).await;
    let removed = disks::remove(&super::layout::vm_dir(&ctx.facts.state_dir, vm_uid)).await;
    ctx.runtime.lock().expect("not poisoned").remove(vm_uid);
    undefined?;
    removed.map_err(|e| Error::Other(e.to_string()))
}

/// Whether `uri` is an address of node `target` (see `endpoint_on_node`), or why not.
async fn target_endpoint(
    ctx: &Context,
    target: &str,
    uri: &str,
) -> Result<Result<(), String>, kube::Error> {
    let node = Api::<k8s_openapi::api::core::v1::Node>::all(ctx.client.clone())
        .get_opt(target)
        .await?;
    Ok(node
        .as_ref()
        .ok_or_else(|| format!("node {target} does not exist"))
        .and_then(|n| crate::api::hypervisor::endpoint_on_node(uri, n)))
}

/// The source agent's look at a Running migration it is not copying: both libvirts are
/// asked where the guest is (the target's through its migration URI, read-only), and the
/// migration is finished or failed accordingly, or looked at again in a few seconds.
async fn settle_interrupted(m: &VirtualMachineMigration, ctx: &Context) -> Result<Action, Error> {
    let status = m.status.clone().unwrap_or_default();
    let target = status.target_node.clone().unwrap_or_default();
    let vm = match get_vm(m, ctx).await {
        Ok(vm) => vm,
        Err(Error::Other(_)) => {
            // The VM is gone: its own deletion cleans both nodes.
            let failed = json!({"phase": MigrationPhase::Failed, "reason": "VMNotFound",
                "message": format!("VirtualMachine {} was deleted", m.spec.vm_name),
                "completionTime": Time(Timestamp::now())});
            patch_status(m, ctx, SOURCE_MANAGER, failed).await?;
            release(m, ctx).await?;
            return Ok(Action::await_change());
        }
        Err(e) => return Err(e),
    };
    let vm_uid = vm.uid().unwrap_or_default();
    let bound_to_target =
        vm.status.as_ref().and_then(|s| s.node_name.as_deref()) == Some(target.as_str());
    let src = ctx.lv.guest(&vm_uid).await.ok();
    let hvs: Api<Hypervisor> = Api::all(ctx.client.clone());
    let dst = match hvs
        .get_opt(&target)
        .await?
        .and_then(|h| h.status)
        .and_then(|s| s.migration_uri)
    {
        Some(uri) if !matches!(target_endpoint(ctx, &target, &uri).await, Ok(Ok(()))) => {
            tracing::warn!(migration = %m.name_any(), %uri, "the target's migration URI is not its node's address: not asking it");
            None
        }
        Some(uri) => match ctx.lv.peek_guest(&uri, &vm_uid).await {
            Ok(g) => Some(g),
            Err(e) => {
                tracing::warn!(migration = %m.name_any(), %uri, error = %e, "cannot ask the target's libvirt");
                None
            }
        },
        None => None,
    };
    let verdict = settle(bound_to_target, src, dst);
    tracing::warn!(migration = %m.name_any(), vm = %vm.name_any(), ?src, ?dst, bound_to_target, ?verdict, "settling a migration this agent stopped watching");
    let outcome = match verdict {
        Settle::Wait(why) => {
            tracing::info!(migration = %m.name_any(), why, "not settled yet");
            return Ok(Action::requeue(Duration::from_secs(2)));
        }
        Settle::Succeeded { stop_source } => {
            ctx.metrics.migration("settled-succeeded");
            Outcome::Succeeded {
                message: format!("moved to {target}; settled after the source agent restarted"),
                downtime: None,
                bytes: None,
                stop_source,
            }
        }
        Settle::Failed {
            message,
            resume_source,
        } => {
            ctx.metrics.migration("settled-failed");
            Outcome::Failed {
                reason: "Interrupted",
                message: format!(
                    "{message} ({}); settled after the source agent restarted",
                    ctx.node
                ),
                resume_source,
            }
        }
    };
    conclude(m, ctx, &vm, outcome, status.start_time).await?;
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrite_moves_paths_and_owner_only() {
        let xml = r#"<domain type="kvm"><name>vmlet_ns_a</name><metadata><vmlet:vm xmlns:vmlet="https://vmlet.dev/domain" namespace="ns" name="a" uid="u" generation="1" node="n1" hash="h"/></metadata><os><kernel>/img/k.bin</kernel></os><devices><disk type="file"><source file="/state/vms/u/root.qcow2"/><backingStore type="file"><source file="/img/base.qcow2"/></backingStore></disk><serial type="file"><source path="/state-other/x &amp; y"/></serial></devices></domain>"#;
        let rw = Rewrite {
            prefixes: vec![
                ("/state".into(), "/b/state".into()),
                ("/img".into(), "/b/img".into()),
            ],
            node: "n2",
        };
        let out = rewrite_xml(xml, &rw).unwrap();
        assert!(out.contains(r#"node="n2""#), "{out}");
        assert!(out.contains("<kernel>/b/img/k.bin</kernel>"), "{out}");
        assert!(out.contains(r#"file="/b/state/vms/u/root.qcow2""#), "{out}");
        assert!(out.contains(r#"file="/b/img/base.qcow2""#), "{out}");
        // A sibling directory that merely shares the prefix's letters is not moved, and
        // escaped text stays escaped.
        assert!(out.contains(r#"path="/state-other/x &amp; y""#), "{out}");
        assert!(out.contains("<name>vmlet_ns_a</name>"), "{out}");
    }

    #[test]
    fn target_settles_only_a_guest_that_runs_here_for_long() {
        let long = SOURCE_SILENCE;
        let short = SOURCE_SILENCE - Duration::from_secs(1);
        // (guest here, running for) -> settles
        for (here, running_for, settles) in [
            (Guest::Active, long, true),
            (Guest::Active, short, false),
            (Guest::PausedForMigration, long, false),
            (Guest::Migrating, long, false),
            (Guest::Absent, long, false),
            (Guest::Stopped, long, false),
            (Guest::MigratedAway, long, false),
        ] {
            assert_eq!(target_settles(here, running_for), settles, "{here:?}");
        }
    }

    #[test]
    fn settle_table() {
        use Guest::*;
        let wait = |s: Settle| matches!(s, Settle::Wait(_));
        let ok = |stop| Settle::Succeeded { stop_source: stop };
        let failed = |s: Settle| matches!(s, Settle::Failed { .. });
        // (bound to target, source, target) -> verdict
        assert!(wait(settle(false, None, Some(Active))));
        assert!(wait(settle(
            false,
            Some(Migrating),
            Some(PausedForMigration)
        )));
        assert!(wait(settle(false, Some(Active), Some(PausedForMigration))));
        assert!(wait(settle(
            false,
            Some(MigratedAway),
            Some(PausedForMigration)
        )));
        assert!(
            wait(settle(true, Some(Active), Some(Active))),
            "two copies: no pick"
        );
        // libvirt says it left, or the target holds the definition it persists on success.
        assert_eq!(settle(false, Some(MigratedAway), Some(Active)), ok(false));
        assert_eq!(settle(false, Some(MigratedAway), None), ok(false));
        assert_eq!(settle(false, Some(MigratedAway), Some(Absent)), ok(false));
        assert_eq!(settle(false, Some(Absent), Some(Active)), ok(false));
        assert_eq!(settle(false, Some(Stopped), Some(Stopped)), ok(false));
        assert_eq!(
            settle(false, Some(PausedForMigration), Some(Active)),
            ok(true)
        );
        // The previous agent rebound before it died.
        assert_eq!(settle(true, Some(Absent), None), ok(false));
        assert_eq!(settle(true, Some(MigratedAway), Some(Absent)), ok(false));
        // The guest is on the source, or nowhere.
        assert!(failed(settle(false, Some(Active), Some(Absent))));
        assert!(failed(settle(false, Some(Active), None)));
        assert!(failed(settle(false, Some(Active), Some(Stopped))));
        assert_eq!(
            settle(false, Some(PausedForMigration), Some(Absent)),
            Settle::Failed {
                message: "the target never took the guest; it resumes on the source",
                resume_source: true
            }
        );
        assert!(failed(settle(false, Some(Absent), Some(Absent))));
        assert!(failed(settle(false, Some(Stopped), Some(Absent))));
        // Without the target's word, a guest that is not on the source is not placed.
        assert!(wait(settle(false, Some(Absent), None)));
        assert!(wait(settle(false, Some(Stopped), None)));
        assert!(wait(settle(false, Some(PausedForMigration), None)));
    }
}
