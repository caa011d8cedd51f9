//! The agent's storage work besides making volumes (agent::volumes): growing a volume
//! while its VM runs, deleting a deleted volume's data, taking snapshots and restoring
//! them. Each acts only on data this node holds: a local volume of this node, a pooled
//! one of a pool this node mounts, the snapshots and restores of VMs bound here.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, ResourceExt};
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use serde_json::json;

use super::Context;
use super::libvirt::Quiesce;
use super::volumes::{snapshot_file, storage_root, volume_file};
use crate::api::volume::{
    RestorePhase, SnapshotIndication, SnapshotPhase, SnapshotVolume, VirtualMachineRestore,
    VirtualMachineSnapshot, VirtualMachineVolume,
};
use crate::api::{SNAPSHOT_FINALIZER, VOLUME_FINALIZER, VirtualMachine, quantity};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes: {0}")]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Libvirt(#[from] super::libvirt::LibvirtError),
    #[error("{0}")]
    Other(String),
}

pub fn error_policy<K: kube::Resource>(obj: Arc<K>, err: &Error, ctx: Arc<Context>) -> Action {
    let kind = match err {
        Error::Kube(_) => "kube",
        Error::Libvirt(_) => "libvirt",
        Error::Other(_) => "other",
    };
    ctx.metrics.reconcile_error("storage", kind);
    tracing::warn!(object = %obj.meta().name.clone().unwrap_or_default(), error = %err, "storage work failed");
    Action::requeue(Duration::from_secs(5))
}

/// The VM named `name` in `ns`, if it is bound here (the agent's cache holds only those).
fn vm_here(ctx: &Context, ns: &str, name: &str) -> Option<Arc<VirtualMachine>> {
    ctx.vms.get(&ObjectRef::new(name).within(ns))
}

/// Whether this node holds the volume's data.
pub(super) fn holds(ctx: &Context, v: &VirtualMachineVolume) -> bool {
    match v.spec.pool() {
        Some(pool) => ctx.pools.contains_key(pool),
        None => v.status.as_ref().and_then(|s| s.node.as_deref()) == Some(ctx.node.as_str()),
    }
}

/// A volume's upkeep where its data is: online growth while its VM runs here, and the
/// deletion of its data once it is deleted and no VM names it.
pub async fn volume(v: Arc<VirtualMachineVolume>, ctx: Arc<Context>) -> Result<Action, Error> {
    if !holds(&ctx, &v) {
        return Ok(Action::await_change());
    }
    let ns = v.namespace().unwrap_or_default();
    let root = storage_root(&ctx, v.spec.storage.as_deref()).map_err(Error::Other)?;
    let path = volume_file(&root, &v.uid().unwrap_or_default());
    let st = v.status.clone().unwrap_or_default();
    if v.metadata.deletion_timestamp.is_some() {
        if st.user.is_some() {
            return Ok(Action::await_change());
        }
        // A fresh look: no VM may name it (its claim may not be written yet).
        let vms: Api<VirtualMachine> = Api::namespaced(ctx.client.clone(), &ns);
        let named = vms
            .list(&Default::default())
            .await?
            .items
            .iter()
            .any(|vm| vm.spec.volumes().any(|n| n == v.name_any()));
        if named {
            return Ok(Action::requeue(Duration::from_secs(10)));
        }
        match tokio::fs::remove_file(&path).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(Error::Other(format!("removing {}: {e}", path.display())));
            }
            _ => {}
        }
        tracing::info!(volume = %v.name_any(), path = %path.display(), "volume data deleted");
        let api: Api<VirtualMachineVolume> = Api::namespaced(ctx.client.clone(), &ns);
        crate::patch::remove_finalizer(&api, &*v, VOLUME_FINALIZER).await?;
        return Ok(Action::await_change());
    }
    let Some(vm) = st.user.as_deref().and_then(|u| vm_here(&ctx, &ns, u)) else {
        return Ok(Action::await_change());
    };
    if tokio::fs::metadata(&path).await.is_err() {
        return Ok(Action::await_change());
    }
    let want = quantity::parse_bytes(&v.spec.size).map_err(|e| Error::Other(e.to_string()))?;
    let (have, _) = super::volumes::sizes(&path).await.map_err(Error::Other)?;
    if want <= have {
        return Ok(Action::requeue(Duration::from_secs(60)));
    }
    let vm_uid = vm.uid().unwrap_or_default();
    let running = ctx
        .lv
        .lookup(&vm_uid)
        .await?
        .is_some_and(|d| d.state.active());
    if !running {
        // Grown before the next start, when no QEMU has the file open.
        return Ok(Action::await_change());
    }
    let outcome = match ctx
        .lv
        .block_resize(&vm_uid, &path.display().to_string(), want)
        .await
    {
        Ok(()) => {
            tracing::info!(volume = %v.name_any(), bytes = want, "volume grown while its VM runs");
            super::volumes::sizes(&path).await
        }
        Err(e) => Err(format!("growing the volume online failed: {e}")),
    };
    super::volumes::report(&ctx, &ns, &v.name_any(), outcome).await?;
    Ok(Action::requeue(Duration::from_secs(60)))
}

/// The snapshot's files for `uid` under every storage root this node has.
fn snapshot_dirs(ctx: &Context, uid: &str) -> Vec<PathBuf> {
    std::iter::once(ctx.facts.state_dir.clone())
        .chain(ctx.pools.values().cloned())
        .map(|root| root.join("snapshots").join(uid))
        .collect()
}

async fn snapshot_status(
    ctx: &Context,
    s: &VirtualMachineSnapshot,
    status: serde_json::Value,
) -> Result<(), kube::Error> {
    let api: Api<VirtualMachineSnapshot> =
        Api::namespaced(ctx.client.clone(), &s.namespace().unwrap_or_default());
    let patch = json!({"apiVersion": "vmlet.dev/v1alpha1", "kind": "VirtualMachineSnapshot", "status": status});
    api.patch_status(
        &s.name_any(),
        &PatchParams::apply(super::FIELD_MANAGER),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

/// Takes a snapshot of a VM bound here, once; deletes its copies when it is deleted.
pub async fn snapshot(s: Arc<VirtualMachineSnapshot>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = s.namespace().unwrap_or_default();
    let uid = s.uid().unwrap_or_default();
    let st = s.status.clone().unwrap_or_default();
    let api: Api<VirtualMachineSnapshot> = Api::namespaced(ctx.client.clone(), &ns);
    if s.metadata.deletion_timestamp.is_some() {
        if st.node.as_deref() == Some(ctx.node.as_str()) || st.node.is_none() {
            for dir in snapshot_dirs(&ctx, &uid) {
                if let Err(e) = super::disks::remove(&dir).await {
                    return Err(Error::Other(e.to_string()));
                }
            }
            crate::patch::remove_finalizer(&api, &*s, SNAPSHOT_FINALIZER).await?;
        }
        return Ok(Action::await_change());
    }
    if st.phase.is_some() {
        return Ok(Action::await_change());
    }
    let Some(vm) = vm_here(&ctx, &ns, &s.spec.vm_name) else {
        return Ok(Action::await_change());
    };
    crate::patch::add_finalizer(&api, &*s, SNAPSHOT_FINALIZER).await?;
    let vm_uid = vm.uid().unwrap_or_default();
    snapshot_status(
        &ctx,
        &s,
        json!({"phase": SnapshotPhase::InProgress, "readyToUse": false, "node": ctx.node, "vmUid": vm_uid}),
    )
    .await?;
    let started = Instant::now();
    let taken = take(&ctx, &vm, &uid).await;
    let status = match taken {
        Ok((volumes, online)) => {
            tracing::info!(snapshot = %s.name_any(), vm = %vm.name_any(), took_s = started.elapsed().as_secs_f64(), "snapshot taken");
            let mut message = format!(
                "{} volume(s) copied in {:.1} s",
                volumes.len(),
                started.elapsed().as_secs_f64()
            );
            match &online {
                Some(Quiesce::Frozen(n)) => message += &format!("; {n} filesystem(s) frozen"),
                Some(Quiesce::Failed(why)) => message += &format!("; not quiesced: {why}"),
                _ => {}
            }
            json!({"phase": SnapshotPhase::Succeeded, "readyToUse": true, "node": ctx.node,
                   "vmUid": vm_uid, "creationTime": Time(Timestamp::now()), "volumes": volumes,
                   "indications": indications(online.as_ref()), "message": message})
        }
        Err(e) => {
            for dir in snapshot_dirs(&ctx, &uid) {
                let _ = super::disks::remove(&dir).await;
            }
            json!({"phase": SnapshotPhase::Failed, "readyToUse": false, "node": ctx.node,
                   "vmUid": vm_uid, "message": e.to_string()})
        }
    };
    snapshot_status(&ctx, &s, status).await?;
    Ok(Action::await_change())
}

/// A volume of the VM as (disk, volume object, its file, the copy's file, storage).
struct Copy {
    disk: String,
    volume: String,
    from: PathBuf,
    to: PathBuf,
    storage: String,
}

async fn copies(ctx: &Context, vm: &VirtualMachine, snap_uid: &str) -> Result<Vec<Copy>, Error> {
    let ns = vm.namespace().unwrap_or_default();
    let api: Api<VirtualMachineVolume> = Api::namespaced(ctx.client.clone(), &ns);
    let mut out = Vec::new();
    for d in &vm.spec.disks {
        let Some(r) = &d.volume else { continue };
        let v = api.get_opt(&r.name).await?.ok_or_else(|| {
            Error::Other(format!("VirtualMachineVolume {} does not exist", r.name))
        })?;
        let root = storage_root(ctx, v.spec.storage.as_deref()).map_err(Error::Other)?;
        out.push(Copy {
            disk: d.name.clone(),
            volume: r.name.clone(),
            from: volume_file(&root, &v.uid().unwrap_or_default()),
            to: snapshot_file(&root, snap_uid, &d.name),
            storage: v
                .spec
                .storage
                .clone()
                .unwrap_or_else(|| crate::api::volume::LOCAL.into()),
        });
    }
    if out.is_empty() {
        return Err(Error::Other(format!(
            "VM {} has no volumes: only volumes are snapshotted",
            vm.name_any()
        )));
    }
    Ok(out)
}

/// Pure: what a snapshot says of its consistency, from how it was taken (None: stopped).
fn indications(online: Option<&Quiesce>) -> Vec<SnapshotIndication> {
    use SnapshotIndication::*;
    match online {
        None => vec![],
        Some(Quiesce::NotAsked) => vec![Online, NoGuestAgent],
        Some(Quiesce::Frozen(_)) => vec![Online, GuestAgent],
        Some(Quiesce::Failed(_)) => vec![Online, QuiesceFailed],
    }
}

/// Copies every volume of the VM: through libvirt's backup job while it runs (one
/// instant for all disks, the guest's filesystems frozen for it when it has a guest
/// agent), by qemu-img while it is stopped (no start meanwhile). With the copies, how the
/// running VM was quiesced (None: it was stopped).
async fn take(
    ctx: &Context,
    vm: &VirtualMachine,
    snap_uid: &str,
) -> Result<(Vec<SnapshotVolume>, Option<Quiesce>), Error> {
    let copies = copies(ctx, vm, snap_uid).await?;
    for c in &copies {
        if let Some(dir) = c.to.parent() {
            super::disks::traversable(dir)
                .await
                .map_err(|e| Error::Other(e.to_string()))?;
        }
    }
    let vm_uid = vm.uid().unwrap_or_default();
    let _busy = Busy::hold(ctx, &vm_uid);
    let domain = ctx.lv.lookup(&vm_uid).await?;
    let online = match domain.filter(|d| d.state.active()) {
        Some(_) => {
            let xml = ctx.lv.migratable_xml(&vm_uid).await?;
            let backup = backup_xml(&xml, &copies).map_err(|e| Error::Other(e.to_string()))?;
            let quiesce = vm.spec.guest_agent == Some(true);
            Some(ctx.lv.backup(&vm_uid, backup, quiesce).await?)
        }
        None => {
            for c in &copies {
                super::disks::copy(&c.from, &c.to)
                    .await
                    .map_err(|e| Error::Other(e.to_string()))?;
            }
            None
        }
    };
    let mut out = Vec::new();
    for c in copies {
        let (size, _) = super::volumes::sizes(&c.to).await.map_err(Error::Other)?;
        super::disks::private_file(&c.to)
            .await
            .map_err(|e| Error::Other(e.to_string()))?;
        out.push(SnapshotVolume {
            disk: c.disk,
            volume: c.volume,
            storage: c.storage,
            size_bytes: size as i64,
        });
    }
    Ok((out, online))
}

/// Pure: libvirt's push-mode backup description: each volume's disk (found by its file
/// in the running domain's XML) to its copy, every other disk left out.
fn backup_xml(domain_xml: &str, copies: &[Copy]) -> Result<String, quick_xml::DeError> {
    let mut disks = String::new();
    for d in super::domain::disks_in(domain_xml)? {
        let copy = copies
            .iter()
            .find(|c| d.file.as_deref().map(std::path::Path::new) == Some(c.from.as_path()));
        let dev = quick_xml::escape::escape(d.dev.as_str()).into_owned();
        match copy {
            Some(c) => {
                let file = quick_xml::escape::escape(c.to.to_string_lossy().as_ref()).into_owned();
                disks.push_str(&format!(
                    "<disk name='{dev}' backup='yes' type='file'><driver type='qcow2'/><target file='{file}'/></disk>"
                ));
            }
            None => disks.push_str(&format!("<disk name='{dev}' backup='no'/>")),
        }
    }
    Ok(format!(
        "<domainbackup mode='push'><disks>{disks}</disks></domainbackup>"
    ))
}

/// Marks a VM busy (no start) for as long as it is held.
struct Busy<'a> {
    ctx: &'a Context,
    uid: String,
}

impl<'a> Busy<'a> {
    fn hold(ctx: &'a Context, uid: &str) -> Self {
        ctx.storage_busy
            .lock()
            .expect("not poisoned")
            .insert(uid.to_string());
        Busy {
            ctx,
            uid: uid.to_string(),
        }
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.ctx
            .storage_busy
            .lock()
            .expect("not poisoned")
            .remove(&self.uid);
    }
}

async fn restore_status(
    ctx: &Context,
    r: &VirtualMachineRestore,
    phase: RestorePhase,
    message: String,
) -> Result<(), kube::Error> {
    let old = r.status.clone().unwrap_or_default();
    if old.phase == Some(phase)
        && old.message.as_deref() == Some(message.as_str())
        && old.node.as_deref() == Some(ctx.node.as_str())
    {
        return Ok(());
    }
    let api: Api<VirtualMachineRestore> =
        Api::namespaced(ctx.client.clone(), &r.namespace().unwrap_or_default());
    let mut status = json!({"phase": phase, "message": message, "node": ctx.node});
    if phase != RestorePhase::Pending {
        status["completionTime"] = json!(Time(Timestamp::now()));
    }
    let patch = json!({"apiVersion": "vmlet.dev/v1alpha1", "kind": "VirtualMachineRestore", "status": status});
    api.patch_status(
        &r.name_any(),
        &PatchParams::apply(super::FIELD_MANAGER),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

/// Puts a stopped VM's volumes back to its snapshot; waits while the VM runs.
pub async fn restore(r: Arc<VirtualMachineRestore>, ctx: Arc<Context>) -> Result<Action, Error> {
    let st = r.status.clone().unwrap_or_default();
    if matches!(
        st.phase,
        Some(RestorePhase::Succeeded | RestorePhase::Failed)
    ) || r.metadata.deletion_timestamp.is_some()
    {
        return Ok(Action::await_change());
    }
    let ns = r.namespace().unwrap_or_default();
    let Some(vm) = vm_here(&ctx, &ns, &r.spec.vm_name) else {
        return Ok(Action::await_change());
    };
    let snaps: Api<VirtualMachineSnapshot> = Api::namespaced(ctx.client.clone(), &ns);
    let Some(snap) = snaps.get_opt(&r.spec.snapshot_name).await? else {
        let msg = format!(
            "VirtualMachineSnapshot {} does not exist",
            r.spec.snapshot_name
        );
        restore_status(&ctx, &r, RestorePhase::Failed, msg).await?;
        return Ok(Action::await_change());
    };
    let s = snap.status.clone().unwrap_or_default();
    let vm_uid = vm.uid().unwrap_or_default();
    if s.phase != Some(SnapshotPhase::Succeeded) || s.vm_uid.as_deref() != Some(vm_uid.as_str()) {
        let msg = format!(
            "VirtualMachineSnapshot {} is not a ready snapshot of this VM",
            r.spec.snapshot_name
        );
        restore_status(&ctx, &r, RestorePhase::Failed, msg).await?;
        return Ok(Action::await_change());
    }
    let busy = Busy::hold(&ctx, &vm_uid);
    if ctx
        .lv
        .lookup(&vm_uid)
        .await?
        .is_some_and(|d| d.state.active())
    {
        drop(busy);
        let msg =
            "waiting for the VM to be stopped (runStrategy Halted, or kubectl vm stop)".to_string();
        restore_status(&ctx, &r, RestorePhase::Pending, msg).await?;
        return Ok(Action::requeue(Duration::from_secs(2)));
    }
    let started = Instant::now();
    let result = put_back(&ctx, &vm, &snap.uid().unwrap_or_default(), &s.volumes).await;
    drop(busy);
    match result {
        Ok(()) => {
            let msg = format!(
                "{} volume(s) restored in {:.1} s",
                s.volumes.len(),
                started.elapsed().as_secs_f64()
            );
            tracing::info!(restore = %r.name_any(), vm = %vm.name_any(), %msg, "restored");
            restore_status(&ctx, &r, RestorePhase::Succeeded, msg).await?;
        }
        Err(e) => restore_status(&ctx, &r, RestorePhase::Failed, e.to_string()).await?,
    }
    Ok(Action::await_change())
}

async fn put_back(
    ctx: &Context,
    vm: &VirtualMachine,
    snap_uid: &str,
    copies: &[SnapshotVolume],
) -> Result<(), Error> {
    let ns = vm.namespace().unwrap_or_default();
    let api: Api<VirtualMachineVolume> = Api::namespaced(ctx.client.clone(), &ns);
    for c in copies {
        let v = api.get_opt(&c.volume).await?.ok_or_else(|| {
            Error::Other(format!("VirtualMachineVolume {} does not exist", c.volume))
        })?;
        if v.status.as_ref().and_then(|s| s.user.as_deref()) != Some(vm.name_any().as_str()) {
            return Err(Error::Other(format!(
                "VirtualMachineVolume {} is not this VM's any more",
                c.volume
            )));
        }
        let root = storage_root(ctx, v.spec.storage.as_deref()).map_err(Error::Other)?;
        let copy_root = storage_root(ctx, Some(&c.storage)).map_err(Error::Other)?;
        let to = volume_file(&root, &v.uid().unwrap_or_default());
        super::disks::copy(&snapshot_file(&copy_root, snap_uid, &c.disk), &to)
            .await
            .map_err(|e| Error::Other(e.to_string()))?;
        let size = quantity::parse_bytes(&v.spec.size).map_err(|e| Error::Other(e.to_string()))?;
        super::disks::grow(&to, size)
            .await
            .map_err(|e| Error::Other(e.to_string()))?;
        super::volumes::report(ctx, &ns, &c.volume, super::volumes::sizes(&to).await).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Shaped as libvirt 9's live XML: more elements and attributes than vmlet writes.
    const LIVE: &str = "<domain type='qemu' id='3'><name>v</name><devices>\
        <emulator>/usr/bin/qemu-system-x86_64</emulator>\
        <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
          <source file='/var/lib/vmlet/volumes/u1.qcow2' index='2'/><backingStore/>\
          <target dev='vda' bus='virtio'/><alias name='ua-disk-data'/></disk>\
        <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
          <source file='/var/lib/vmlet/vms/x/disk-root.qcow2'/><target dev='vdb' bus='virtio'/></disk>\
        <disk type='file' device='cdrom'><source file='/var/lib/vmlet/vms/x/disk-seed.iso'/>\
          <target dev='sda' bus='sata'/><readonly/></disk>\
        <controller type='usb' index='0' model='none'/><memballoon model='virtio'/></devices></domain>";

    #[test]
    fn a_snapshot_says_how_consistent_it_is() {
        use SnapshotIndication::*;
        let cases = [
            (None, vec![]),
            (Some(Quiesce::NotAsked), vec![Online, NoGuestAgent]),
            (Some(Quiesce::Frozen(0)), vec![Online, GuestAgent]),
            (
                Some(Quiesce::Failed("x".into())),
                vec![Online, QuiesceFailed],
            ),
        ];
        for (online, want) in cases {
            assert_eq!(indications(online.as_ref()), want, "{online:?}");
        }
    }

    #[test]
    fn a_backup_copies_the_volumes_and_leaves_out_every_other_disk() {
        let copies = [Copy {
            disk: "data".into(),
            volume: "data".into(),
            from: PathBuf::from("/var/lib/vmlet/volumes/u1.qcow2"),
            to: PathBuf::from("/var/lib/vmlet/snapshots/s1/data.qcow2"),
            storage: "local".into(),
        }];
        assert_eq!(
            backup_xml(LIVE, &copies).unwrap(),
            "<domainbackup mode='push'><disks>\
             <disk name='vda' backup='yes' type='file'><driver type='qcow2'/><target file='/var/lib/vmlet/snapshots/s1/data.qcow2'/></disk>\
             <disk name='vdb' backup='no'/><disk name='sda' backup='no'/></disks></domainbackup>"
        );
    }

    #[test]
    fn a_migration_copies_the_writable_disks_not_on_a_pool() {
        use std::path::Path;
        let copy = |pools: &[&str]| {
            super::super::migration::disks_to_copy(LIVE, pools.iter().map(Path::new)).unwrap()
        };
        let dev = |d: &[&str]| d.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(copy(&[]), (dev(&["vda", "vdb"]), false));
        assert_eq!(copy(&["/var/lib/vmlet/volumes"]), (dev(&["vdb"]), true));
        assert_eq!(copy(&["/srv/nfs"]), (dev(&["vda", "vdb"]), false));
    }
}
