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

use super::{Context, disks, render};
use crate::api::{
    Hypervisor, MIGRATION_FINALIZER, MigrationPhase, VirtualMachine, VirtualMachineMigration,
    VirtualMachineMigrationStatus, conditions,
};

/// Field managers: source and target write different parts of one status.
const SOURCE_MANAGER: &str = "vmlet-agent-migration-source";
const TARGET_MANAGER: &str = "vmlet-agent-migration-target";
/// The manager of the one write that moves a VM's binding to the migration's target.
const REBIND_MANAGER: &str = "vmlet-agent-migration";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes: {0}")]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Libvirt(#[from] super::libvirt::LibvirtError),
    #[error("{0}")]
    Other(String),
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

/// Copies in flight on this node, by migration uid: the VM's uid, to abort them.
#[derive(Default)]
pub struct InFlight(std::sync::Mutex<std::collections::HashMap<String, String>>);

impl InFlight {
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
    if m.metadata.deletion_timestamp.is_some() {
        if is_source && phase == MigrationPhase::Running {
            match ctx.migrations.vm_of(&uid) {
                // The copy's own task reports Failed/Aborted and lets go of the object.
                Some(vm_uid) => {
                    tracing::warn!(migration = %m.name_any(), "cancelled: aborting the copy");
                    ctx.lv.abort_job(&vm_uid).await?;
                }
                // Not copying (this agent restarted): nothing to abort.
                None => release(&m, &ctx).await?,
            }
        }
        return Ok(Action::await_change());
    }
    if phase != MigrationPhase::Scheduling {
        return Ok(Action::await_change());
    }
    let ready = conditions::is_true(&status.conditions, "TargetReady");
    if is_target && !ready {
        prepare_target(&m, &ctx).await?;
    } else if is_source && ready && ctx.migrations.vm_of(&uid).is_none() {
        start_copy(m, ctx).await?;
    }
    Ok(Action::await_change())
}

pub fn error_policy(m: Arc<VirtualMachineMigration>, err: &Error, ctx: Arc<Context>) -> Action {
    tracing::warn!(migration = %m.name_any(), error = %err, "migration step failed");
    ctx.metrics.error("migration");
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
    let uid = vm.uid().unwrap_or_default();
    let images = super::reconcile::resolve_images(&vm, ctx)
        .await
        .map_err(|p| Error::Other(p.message))?;
    let files = render::disk_files(&vm.spec, &uid, &ctx.facts.state_dir, &images)
        .map_err(|e| Error::Other(e.to_string()))?;
    disks::prepare(
        &render::vm_dir(&ctx.facts.state_dir, &uid),
        &files,
        &uid,
        &vm.name_any(),
    )
    .await
    .map_err(|e| Error::Other(e.to_string()))?;
    let old = m.status.clone().unwrap_or_default();
    let cond = conditions::new(
        &old.conditions,
        "TargetReady",
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
        .collect(),
        node: &target,
    };
    let xml = ctx.lv.migratable_xml(&vm_uid).await?;
    let dest_xml = rewrite_xml(&xml, &rw).map_err(|e| Error::Other(e.to_string()))?;
    let started = Time(Timestamp::now());
    patch_status(
        &m,
        &ctx,
        SOURCE_MANAGER,
        json!({"phase": "Running", "reason": "Copying", "message": format!("copying to {target}"), "startTime": started}),
    )
    .await?;
    let mig_uid = m.uid().unwrap_or_default();
    ctx.migrations
        .0
        .lock()
        .expect("not poisoned")
        .insert(mig_uid.clone(), vm_uid.clone());
    ctx.metrics.migration("started");
    tracing::info!(migration = %m.name_any(), vm = %vm.name_any(), %target, "live migration starting");
    tokio::spawn(async move {
        let t = Instant::now();
        let data_uri = format!("tcp://{host}");
        let res = ctx
            .lv
            .migrate(&vm_uid, &dest_uri, &data_uri, dest_xml)
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
    let mut status = VirtualMachineMigrationStatus {
        start_time: Some(started),
        completion_time: Some(Time(Timestamp::now())),
        ..Default::default()
    };
    match res {
        Ok(()) => {
            let (downtime, bytes) = ctx.lv.completed_job(&vm_uid).await.unwrap_or_default();
            // The binding moves in one write, with the resource version the copy began
            // with as its precondition: status.nodeName changes exactly once.
            let api: Api<VirtualMachine> =
                Api::namespaced(ctx.client.clone(), &vm.namespace().unwrap_or_default());
            // The guest runs on the target now: the binding must follow, however long the
            // API server takes. Retried with backoff (conflicts at once) until it lands;
            // giving up would leave the VM bound to a node that no longer runs it.
            let mut wait = Duration::from_millis(200);
            loop {
                let attempt = async {
                    let fresh = api.get(&vm.name_any()).await?;
                    let patch = json!({
                        "metadata": {"resourceVersion": fresh.resource_version()},
                        "status": {"nodeName": target},
                    });
                    api.patch_status(
                        &vm.name_any(),
                        &crate::patch::by(REBIND_MANAGER),
                        &Patch::Merge(&patch),
                    )
                    .await
                };
                match attempt.await {
                    Ok(_) => break,
                    Err(kube::Error::Api(s)) if s.code == 409 => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Err(kube::Error::Api(s)) if s.code == 404 => {
                        // The VM was deleted meanwhile: nothing is left to bind.
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(vm = %vm.name_any(), error = %e, retry_in_s = wait.as_secs_f64(), "rebinding after a migration failed; retrying");
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(Duration::from_secs(10));
                    }
                }
            }
            // The source's definition, kept for the job statistics, goes now.
            let _ = ctx.lv.undefine(&vm_uid).await;
            let _ = disks::remove(&render::vm_dir(&ctx.facts.state_dir, &vm_uid)).await;
            ctx.runtime.lock().expect("not poisoned").remove(&vm_uid);
            status.phase = Some(MigrationPhase::Succeeded);
            status.reason = Some("Migrated".into());
            status.message = Some(format!(
                "moved to {target} in {:.2} s{}",
                took.as_secs_f64(),
                downtime
                    .map(|d| format!(", guest paused {d} ms"))
                    .unwrap_or_default()
            ));
            status.downtime_milliseconds = downtime.map(|d| d as i64);
            status.data_transferred_bytes = bytes.map(|b| b as i64);
            ctx.metrics
                .migration_done(true, took, downtime.map(|d| d as f64 / 1000.0));
            tracing::info!(migration = %m.name_any(), %target, took_s = took.as_secs_f64(), ?downtime, "live migration succeeded");
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
            status.phase = Some(MigrationPhase::Failed);
            status.reason = Some(
                if cancelled {
                    "Aborted"
                } else {
                    "MigrationFailed"
                }
                .into(),
            );
            status.message = Some(format!("the VM keeps running on {}: {e}", ctx.node));
            ctx.metrics.migration_done(false, took, None);
            tracing::warn!(migration = %m.name_any(), error = %e, "live migration failed");
        }
    }
    let value = serde_json::to_value(&status).map_err(|e| Error::Other(e.to_string()))?;
    match patch_status(m, ctx, SOURCE_MANAGER, value).await {
        Ok(()) | Err(kube::Error::Api(_)) => {}
        Err(e) => return Err(e.into()),
    }
    release(m, ctx).await?;
    Ok(())
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
}
