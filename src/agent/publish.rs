//! Published images: a VirtualMachineImage whose source is a volume, or one disk of a
//! snapshot, is a template made of a configured disk. The node that holds the source's
//! data copies it once into `<storage root>/published/<image uid>.qcow2` (flattened: no
//! backing file) and records where the copy lives in `status.published`; VMs and volumes
//! that use the image are then placed where that copy is. The copy outlives its source
//! and goes with the image, once no VM and no volume in the making uses it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kube::api::{Api, Patch, PatchParams, ResourceExt};
use kube::runtime::controller::Action;
use serde_json::json;

use super::Context;
use super::image_report::{self, Found};
use super::storage::Error;
use super::volumes::{image_file, sizes, snapshot_file, storage_root, volume_file};
use crate::api::image::{PublishedImage, VirtualMachineImage};
use crate::api::volume::{SnapshotPhase, VirtualMachineSnapshot, VirtualMachineVolume};
use crate::api::{IMAGE_FINALIZER, VirtualMachine};

/// The field manager of `status.published`: apart from the per-node entries' managers,
/// whose applies would otherwise remove it.
const MANAGER: &str = "vmlet-agent-publish";

/// What the node holding a published image's source copies.
#[derive(Debug, PartialEq, Eq)]
struct Source {
    file: PathBuf,
    /// `local` or a pool: where the copy is kept, beside its source.
    storage: String,
    /// The source volume's resourceVersion: the copy is kept only if it has not moved (no
    /// VM claimed the volume meanwhile).
    volume_version: Option<String>,
}

/// Why this node does not copy the source now.
enum NotNow {
    /// Another node holds the data, or nobody does: nothing to say here.
    NotHere,
    /// This node holds it; the entry says why it waits.
    Waiting(&'static str, String),
}

/// Whether this node keeps the copy `p` (and so deletes it).
fn keeps(ctx: &Context, p: &PublishedImage) -> bool {
    match p.pinned_node() {
        Some(n) => n == ctx.node,
        None => ctx.pools.contains_key(&p.storage),
    }
}

/// Publishes the image if this node holds its source; deletes the copy with the image.
pub async fn reconcile(img: Arc<VirtualMachineImage>, ctx: Arc<Context>) -> Result<Action, Error> {
    if !img.spec.published() {
        return Ok(Action::await_change());
    }
    let ns = img.namespace().unwrap_or_default();
    let api: Api<VirtualMachineImage> = Api::namespaced(ctx.client.clone(), &ns);
    let published = img.status.as_ref().and_then(|s| s.published.clone());
    if img.metadata.deletion_timestamp.is_some() {
        return delete(&ctx, &api, &img, published.as_ref()).await;
    }
    if published.is_some() {
        return Ok(Action::await_change());
    }
    let source = match source(&ctx, &img).await? {
        Ok(s) => s,
        Err(NotNow::NotHere) => return Ok(Action::await_change()),
        Err(NotNow::Waiting(reason, message)) => {
            image_report::report(&ctx, &img, Found::Waiting { reason, message }).await;
            return Ok(Action::requeue(Duration::from_secs(10)));
        }
    };
    match crate::patch::add_finalizer(&api, &*img, IMAGE_FINALIZER).await {
        // Changed since it was read (its phase, an entry): look at it again.
        Err(kube::Error::Api(s)) if matches!(s.code, 409 | 422) => {
            return Ok(Action::requeue(Duration::from_millis(200)));
        }
        r => r?,
    }
    let uid = img.uid().unwrap_or_default();
    let root = storage_root(&ctx, Some(&source.storage)).map_err(Error::Other)?;
    let file = image_file(&root, &uid);
    let started = std::time::Instant::now();
    if let Err(e) = copy_once(&ctx, &source, &file).await {
        image_report::report(
            &ctx,
            &img,
            Found::Waiting {
                reason: "ImagePublishFailed",
                message: e.to_string(),
            },
        )
        .await;
        return Ok(Action::requeue(Duration::from_secs(30)));
    }
    if !source_unmoved(&ctx, &img, &source).await? {
        // A VM claimed the volume while it was copied: the copy may hold half its writes.
        let _ = tokio::fs::remove_file(&file).await;
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    let (size, _) = sizes(&file).await.map_err(Error::Other)?;
    let status = PublishedImage {
        storage: source.storage.clone(),
        node: ctx.node.clone(),
        size_bytes: i64::try_from(size).unwrap_or(i64::MAX),
    };
    let patch = json!({
        "apiVersion": "vmlet.dev/v1alpha1",
        "kind": "VirtualMachineImage",
        "status": {"published": status},
    });
    if let Err(e) = api
        .patch_status(
            &img.name_any(),
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
    {
        // Gone meanwhile (its finalizer is ours, so only if another node published it):
        // this copy is nobody's.
        if matches!(&e, kube::Error::Api(s) if s.code == 404) {
            let _ = tokio::fs::remove_file(&file).await;
        }
        return Err(e.into());
    }
    tracing::info!(image = %img.name_any(), storage = %source.storage, secs = started.elapsed().as_secs_f64(), "published");
    let size = tokio::fs::metadata(&file).await.ok().map(|m| m.len());
    image_report::report(&ctx, &img, Found::Ready { size }).await;
    Ok(Action::await_change())
}

/// The source's file if this node holds it and it can be copied now.
async fn source(ctx: &Context, img: &VirtualMachineImage) -> Result<Result<Source, NotNow>, Error> {
    let ns = img.namespace().unwrap_or_default();
    if let Some(r) = &img.spec.source.snapshot {
        let api: Api<VirtualMachineSnapshot> = Api::namespaced(ctx.client.clone(), &ns);
        let Some(s) = api.get_opt(&r.name).await? else {
            return Ok(Err(NotNow::NotHere));
        };
        let st = s.status.clone().unwrap_or_default();
        if st.node.as_deref() != Some(ctx.node.as_str()) {
            return Ok(Err(NotNow::NotHere));
        }
        if st.phase != Some(SnapshotPhase::Succeeded) {
            let msg = format!("VirtualMachineSnapshot {} is not ready to use", r.name);
            return Ok(Err(NotNow::Waiting("ImageSourceNotReady", msg)));
        }
        let Some(copy) = st.volumes.iter().find(|v| v.disk == r.disk) else {
            let msg = format!("VirtualMachineSnapshot {} has no disk {}", r.name, r.disk);
            return Ok(Err(NotNow::Waiting("ImageSourceNotFound", msg)));
        };
        let root = storage_root(ctx, Some(&copy.storage)).map_err(Error::Other)?;
        return Ok(Ok(Source {
            file: snapshot_file(&root, &s.uid().unwrap_or_default(), &r.disk),
            storage: copy.storage.clone(),
            volume_version: None,
        }));
    }
    let Some(r) = &img.spec.source.volume else {
        return Ok(Err(NotNow::NotHere));
    };
    let api: Api<VirtualMachineVolume> = Api::namespaced(ctx.client.clone(), &ns);
    let Some(v) = api.get_opt(&r.name).await? else {
        return Ok(Err(NotNow::NotHere));
    };
    let st = v.status.clone().unwrap_or_default();
    if !super::storage::holds(ctx, &v) {
        return Ok(Err(NotNow::NotHere));
    }
    if let Some(user) = st.user {
        let msg = format!(
            "VirtualMachineVolume {} is in use by VM {user}: it is published once no VM uses it \
             (or publish a snapshot of the VM)",
            r.name
        );
        return Ok(Err(NotNow::Waiting("ImageSourceInUse", msg)));
    }
    let root = storage_root(ctx, v.spec.storage.as_deref()).map_err(Error::Other)?;
    let file = volume_file(&root, &v.uid().unwrap_or_default());
    if tokio::fs::metadata(&file).await.is_err() {
        let msg = format!(
            "VirtualMachineVolume {} holds no data yet: a VM makes it on first use",
            r.name
        );
        return Ok(Err(NotNow::Waiting("ImageSourceEmpty", msg)));
    }
    Ok(Ok(Source {
        file,
        storage: v.spec.storage.clone().unwrap_or_else(|| "local".into()),
        volume_version: v.resource_version(),
    }))
}

/// Copies the source to `file` unless it is there. On a pool several nodes may race: each
/// copies to a file of its own and links it into place; the first link wins.
async fn copy_once(ctx: &Context, source: &Source, file: &std::path::Path) -> Result<(), Error> {
    if tokio::fs::metadata(file).await.is_ok() {
        return Ok(());
    }
    let dir = file.parent().expect("under a storage root");
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(|e| Error::Other(format!("{}: {e}", dir.display())))?;
    let part = dir.join(format!(
        ".{}.{}.part",
        file.file_name().unwrap_or_default().to_string_lossy(),
        ctx.node
    ));
    super::disks::copy(&source.file, &part)
        .await
        .map_err(|e| Error::Other(e.to_string()))?;
    let linked = tokio::fs::hard_link(&part, file).await;
    let _ = tokio::fs::remove_file(&part).await;
    match linked {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(Error::Other(format!("{}: {e}", file.display()))),
    }
}

/// Whether the source volume (if any) is as it was when the copy began.
async fn source_unmoved(
    ctx: &Context,
    img: &VirtualMachineImage,
    source: &Source,
) -> Result<bool, Error> {
    let (Some(seen), Some(r)) = (&source.volume_version, &img.spec.source.volume) else {
        return Ok(true);
    };
    let api: Api<VirtualMachineVolume> =
        Api::namespaced(ctx.client.clone(), &img.namespace().unwrap_or_default());
    let now = api.get_opt(&r.name).await?;
    Ok(now.and_then(|v| v.resource_version()).as_ref() == Some(seen))
}

/// A deleted image: its copy goes once nothing uses it, then its finalizer.
async fn delete(
    ctx: &Context,
    api: &Api<VirtualMachineImage>,
    img: &VirtualMachineImage,
    published: Option<&PublishedImage>,
) -> Result<Action, Error> {
    if !img.finalizers().iter().any(|f| f == IMAGE_FINALIZER) {
        return Ok(Action::await_change());
    }
    if let Some(p) = published {
        if !keeps(ctx, p) {
            return Ok(Action::await_change());
        }
        if let Some(user) = used_by(ctx, img).await? {
            tracing::debug!(image = %img.name_any(), %user, "deleted image still in use");
            return Ok(Action::requeue(Duration::from_secs(5)));
        }
        let root = storage_root(ctx, Some(&p.storage)).map_err(Error::Other)?;
        let file = image_file(&root, &img.uid().unwrap_or_default());
        match tokio::fs::remove_file(&file).await {
            Ok(()) => tracing::info!(image = %img.name_any(), "deleted published copy"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::Other(format!("{}: {e}", file.display()))),
        }
    }
    crate::patch::remove_finalizer(api, img, IMAGE_FINALIZER).await?;
    Ok(Action::await_change())
}

/// A fresh look for what still reads the copy: a VM with a disk on the image (an overlay
/// keeps it as its backing file), or a volume made from it that has no data yet.
async fn used_by(ctx: &Context, img: &VirtualMachineImage) -> Result<Option<String>, Error> {
    let ns = img.namespace().unwrap_or_default();
    let name = img.name_any();
    let vms: Api<VirtualMachine> = Api::namespaced(ctx.client.clone(), &ns);
    let vm = vms
        .list(&Default::default())
        .await?
        .items
        .into_iter()
        .find(|vm| {
            vm.spec
                .disks
                .iter()
                .any(|d| d.image.as_ref().is_some_and(|i| i.name == name))
        });
    if let Some(vm) = vm {
        return Ok(Some(format!("VM {}", vm.name_any())));
    }
    let volumes: Api<VirtualMachineVolume> = Api::namespaced(ctx.client.clone(), &ns);
    let vol = volumes
        .list(&Default::default())
        .await?
        .items
        .into_iter()
        .find(|v| {
            let from_it = v
                .spec
                .source
                .as_ref()
                .and_then(|s| s.image.as_ref())
                .is_some_and(|i| i.name == name);
            from_it && v.status.as_ref().and_then(|s| s.allocated_bytes).is_none()
        });
    Ok(vol.map(|v| format!("volume {}", v.name_any())))
}
