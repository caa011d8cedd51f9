//! VirtualMachineVolumes on this node: where their files live (a local volume in the
//! state directory, a pooled one in its storage pool), what a new one is made from, and
//! the agent's part of their status. The file of a volume is named by its uid, never by
//! anything a user writes, so no name can reach outside its storage.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, ResourceExt};
use serde_json::json;

use super::Context;
use super::status::Problem;
use crate::api::volume::{
    SnapshotPhase, VirtualMachineSnapshot, VirtualMachineVolume, VolumePhase,
};
use crate::api::{VirtualMachine, VirtualMachineImage, conditions, quantity};

/// Parses `--storage-pool NAME=PATH` flags: absolute paths, DNS-label names, no repeats.
pub fn parse_pools(flags: &[String]) -> Result<BTreeMap<String, PathBuf>, String> {
    let mut pools = BTreeMap::new();
    for f in flags {
        let (name, path) = f
            .split_once('=')
            .ok_or_else(|| format!("--storage-pool {f}: expected NAME=PATH"))?;
        let label = !name.is_empty()
            && name.len() <= 63
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !name.starts_with('-')
            && !name.ends_with('-');
        if !label || name == crate::api::volume::LOCAL {
            return Err(format!(
                "--storage-pool {f}: the name must be a DNS label other than 'local'"
            ));
        }
        let path = PathBuf::from(path);
        if !path.is_absolute() || path.components().any(|c| c.as_os_str() == "..") {
            return Err(format!("--storage-pool {f}: the path must be absolute"));
        }
        if pools.insert(name.to_string(), path).is_some() {
            return Err(format!("--storage-pool {name} is given twice"));
        }
    }
    Ok(pools)
}

/// The directory where files of `storage` live on this node: the state directory for
/// local storage, the pool's directory otherwise.
pub fn storage_root(ctx: &Context, storage: Option<&str>) -> Result<PathBuf, String> {
    match storage.filter(|s| *s != crate::api::volume::LOCAL) {
        None => Ok(ctx.facts.state_dir.clone()),
        Some(pool) => ctx
            .pools
            .get(pool)
            .cloned()
            .ok_or_else(|| format!("node {} has no storage pool {pool}", ctx.node)),
    }
}

/// A volume's file under its storage root.
pub fn volume_file(root: &Path, volume_uid: &str) -> PathBuf {
    root.join("volumes").join(format!("{volume_uid}.qcow2"))
}

/// A published image's copy under its storage root. Not under the image root's default
/// (`<state>/images`), where a hostPath image of another namespace could name it.
pub fn image_file(root: &Path, image_uid: &str) -> PathBuf {
    root.join("published").join(format!("{image_uid}.qcow2"))
}

/// One disk's copy in a snapshot, under its storage root.
pub fn snapshot_file(root: &Path, snapshot_uid: &str, disk: &str) -> PathBuf {
    root.join("snapshots")
        .join(snapshot_uid)
        .join(format!("{disk}.qcow2"))
}

/// What a volume's file is made from when it does not exist yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    Empty,
    /// A full copy of this file (an image, a volume or a snapshot's copy).
    Copy {
        from: PathBuf,
        format: &'static str,
    },
}

/// A volume a VM uses, resolved on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalVolume {
    pub name: String,
    pub path: PathBuf,
    pub size: u64,
    pub origin: Origin,
    /// On a storage pool: other nodes open the same file.
    pub shared: bool,
}

fn problem(reason: &'static str, message: String) -> Problem {
    Problem::retrying(reason, message)
}

/// The VM's volumes as files on this node. Each must be claimed by this VM (the
/// controller records the claim before it binds the VM) and, if local, live here.
pub async fn resolve(
    vm: &VirtualMachine,
    ctx: &Context,
) -> Result<BTreeMap<String, LocalVolume>, Problem> {
    let ns = vm.namespace().unwrap_or_default();
    let api: Api<VirtualMachineVolume> = Api::namespaced(ctx.client.clone(), &ns);
    let mut out = BTreeMap::new();
    for name in vm.spec.volumes() {
        let vol = api.get_opt(name).await.map_err(|e| {
            problem(
                "VolumeNotFound",
                format!("cannot read VirtualMachineVolume {name}: {e}"),
            )
        })?;
        let Some(vol) = vol else {
            return Err(problem(
                "VolumeNotFound",
                format!("VirtualMachineVolume {ns}/{name} does not exist: create it"),
            ));
        };
        let status = vol.status.clone().unwrap_or_default();
        if status.user.as_deref() != Some(vm.name_any().as_str()) {
            return Err(problem(
                "VolumeInUse",
                format!(
                    "VirtualMachineVolume {name} is claimed by {}",
                    status.user.as_deref().unwrap_or("no VM yet")
                ),
            ));
        }
        if vol.spec.pool().is_none() && status.node.as_deref().is_some_and(|n| n != ctx.node) {
            return Err(problem(
                "VolumeElsewhere",
                format!(
                    "VirtualMachineVolume {name} lives on node {:?}",
                    status.node
                ),
            ));
        }
        let root = storage_root(ctx, vol.spec.storage.as_deref())
            .map_err(|m| problem("StoragePoolMissing", m))?;
        let path = volume_file(&root, &vol.uid().unwrap_or_default());
        let origin = if tokio::fs::metadata(&path).await.is_ok() {
            Origin::Empty
        } else {
            origin(ctx, &ns, &vol).await?
        };
        let size = quantity::parse_bytes(&vol.spec.size)
            .map_err(|e| Problem::needs_change("InvalidSpec", e.to_string()))?;
        out.insert(
            name.to_string(),
            LocalVolume {
                name: name.to_string(),
                shared: vol.spec.pool().is_some(),
                path,
                size,
                origin,
            },
        );
    }
    Ok(out)
}

/// The source object `name` of kind `K` in `ns`, or VolumeSourceNotFound.
async fn source_object<K>(ctx: &Context, ns: &str, name: &str) -> Result<K, Problem>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(ctx.client.clone(), ns);
    api.get_opt(name).await.ok().flatten().ok_or_else(|| {
        problem(
            "VolumeSourceNotFound",
            format!("{} {name} does not exist", K::kind(&())),
        )
    })
}

/// Where a new volume's data comes from.
async fn origin(ctx: &Context, ns: &str, vol: &VirtualMachineVolume) -> Result<Origin, Problem> {
    let Some(source) = &vol.spec.source else {
        return Ok(Origin::Empty);
    };
    if let Some(img) = &source.image {
        let image: VirtualMachineImage = source_object(ctx, ns, &img.name).await?;
        let local = ctx.images.ensure(&image).await.map_err(|e| {
            problem(
                "VolumeSourceNotReady",
                format!("VirtualMachineImage {}: {e}", img.name),
            )
        })?;
        return Ok(Origin::Copy {
            from: local.path,
            format: local.format,
        });
    }
    if let Some(other) = &source.volume {
        let src: VirtualMachineVolume = source_object(ctx, ns, &other.name).await?;
        if let Some(user) = src.status.as_ref().and_then(|s| s.user.clone()) {
            return Err(problem(
                "VolumeSourceInUse",
                format!(
                    "VirtualMachineVolume {} is in use by VM {user}: a copy of a disk being \
                     written is not consistent; snapshot the VM and clone the snapshot",
                    other.name
                ),
            ));
        }
        let root = storage_root(ctx, src.spec.storage.as_deref())
            .map_err(|m| problem("StoragePoolMissing", m))?;
        return Ok(Origin::Copy {
            from: volume_file(&root, &src.uid().unwrap_or_default()),
            format: "qcow2",
        });
    }
    let Some(snap) = &source.snapshot else {
        return Ok(Origin::Empty);
    };
    let s: VirtualMachineSnapshot = source_object(ctx, ns, &snap.name).await?;
    let st = s.status.clone().unwrap_or_default();
    if st.phase != Some(SnapshotPhase::Succeeded) {
        return Err(problem(
            "VolumeSourceNotReady",
            format!("VirtualMachineSnapshot {} is not ready", snap.name),
        ));
    }
    let copy = st
        .volumes
        .iter()
        .find(|v| v.disk == snap.disk)
        .ok_or_else(|| {
            Problem::needs_change(
                "VolumeSourceNotFound",
                format!(
                    "VirtualMachineSnapshot {} has no disk {}",
                    snap.name, snap.disk
                ),
            )
        })?;
    let root =
        storage_root(ctx, Some(&copy.storage)).map_err(|m| problem("StoragePoolMissing", m))?;
    Ok(Origin::Copy {
        from: snapshot_file(&root, &s.uid().unwrap_or_default(), &snap.disk),
        format: "qcow2",
    })
}

/// Writes the agent's part of a volume's status when it changed: Ready with its sizes,
/// or Failed with why.
pub async fn report(
    ctx: &Context,
    ns: &str,
    name: &str,
    outcome: Result<(u64, u64), String>,
) -> Result<(), kube::Error> {
    let api: Api<VirtualMachineVolume> = Api::namespaced(ctx.client.clone(), ns);
    let Some(vol) = api.get_opt(name).await? else {
        return Ok(());
    };
    let old = vol.status.clone().unwrap_or_default();
    let (phase, ok, reason, message, sizes) = match &outcome {
        Ok((allocated, used)) => (
            VolumePhase::Ready,
            true,
            "Ready",
            format!(
                "{} on node {}",
                vol.spec.storage.as_deref().unwrap_or("local"),
                ctx.node
            ),
            Some((*allocated as i64, *used as i64)),
        ),
        Err(why) => (
            VolumePhase::Failed,
            false,
            "VolumeFailed",
            why.clone(),
            None,
        ),
    };
    let cond = conditions::new(
        &old.conditions,
        conditions::Type::VolumeReady,
        ok,
        reason,
        message,
        vol.metadata.generation,
        Time(Timestamp::now()),
    );
    let same = old.phase == Some(phase)
        && sizes.is_none_or(|(a, u)| old.allocated_bytes == Some(a) && old.used_bytes == Some(u))
        && conditions::find(&old.conditions, conditions::Type::VolumeReady)
            .is_some_and(|c| c.status == cond.status && c.message == cond.message);
    if same {
        return Ok(());
    }
    let mut status = json!({"phase": phase, "conditions": [cond]});
    if let Some((a, u)) = sizes.or(old.allocated_bytes.zip(old.used_bytes)) {
        status["allocatedBytes"] = json!(a);
        status["usedBytes"] = json!(u);
    }
    let patch = json!({"apiVersion": "vmlet.dev/v1alpha1", "kind": "VirtualMachineVolume", "status": status});
    api.patch_status(
        name,
        &PatchParams::apply(super::FIELD_MANAGER),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

/// (size the guest sees, bytes the file takes) of a qcow2 file.
pub async fn sizes(path: &Path) -> Result<(u64, u64), String> {
    let info = super::disks::info(path).await.map_err(|e| e.to_string())?;
    let used = tokio::fs::metadata(path)
        .await
        .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
        .map_err(|e| e.to_string())?;
    Ok((info.virtual_size, used))
}
