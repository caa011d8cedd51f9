//! VirtualMachineVolumes, the controller's half: what a VM's volumes ask of its node
//! (decided from the caches, before placement), the claim that makes one VM a volume's
//! only writer (`status.user`, and `status.node` when a local volume is first used), the
//! claim's release once that VM is gone or no longer names the volume, and the volume's
//! finalizer. The agents make, grow and delete the files (agent::volumes).

use std::sync::Arc;
use std::time::Duration;

use kube::api::{Api, Patch, PatchParams, ResourceExt};
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use serde_json::json;

use super::{Context, FIELD_MANAGER};
use crate::api::volume::{SnapshotPhase, VirtualMachineSnapshot, VirtualMachineVolume};
use crate::api::{VOLUME_FINALIZER, VirtualMachine, VirtualMachineImage};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes: {0}")]
    Kube(#[from] kube::Error),
}

/// What a VM's volumes ask of the node that runs it.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Needs {
    /// Its local volumes live there (or, new, are copied from a local source there).
    pub node: Option<String>,
    /// Storage pools the node must have.
    pub pools: Vec<String>,
}

/// Why the VM's volumes keep it from being placed now.
#[derive(Debug, PartialEq, Eq)]
pub struct Blocked {
    pub reason: &'static str,
    pub message: String,
}

fn blocked(reason: &'static str, message: String) -> Blocked {
    Blocked { reason, message }
}

/// The objects `needs` looks up by name in the VM's namespace.
pub struct Lookup<'a> {
    pub volume: &'a dyn Fn(&str) -> Option<Arc<VirtualMachineVolume>>,
    pub snapshot: &'a dyn Fn(&str) -> Option<Arc<VirtualMachineSnapshot>>,
    pub image: &'a dyn Fn(&str) -> Option<Arc<VirtualMachineImage>>,
}

impl Needs {
    fn pin(&mut self, node: String, why: &str) -> Result<(), Blocked> {
        match &self.node {
            Some(n) if *n != node => Err(blocked(
                "VolumeConflict",
                format!("{why} lives on node {node}, other local data on {n}"),
            )),
            _ => {
                self.node = Some(node);
                Ok(())
            }
        }
    }

    fn pool(&mut self, pool: &str) {
        if !self.pools.iter().any(|p| p == pool) {
            self.pools.push(pool.to_string());
        }
    }

    /// A published image's copy is read where it is kept (other images: anywhere).
    fn image(&mut self, look: &Lookup<'_>, name: &str, why: &str) -> Result<(), Blocked> {
        let Some(img) = (look.image)(name).filter(|i| i.spec.published()) else {
            return Ok(());
        };
        match img.status.as_ref().and_then(|s| s.published.as_ref()) {
            None => Err(blocked(
                "ImageNotPublished",
                format!("VirtualMachineImage {name} is not published yet"),
            )),
            Some(p) => match p.pinned_node() {
                Some(node) => self.pin(node.to_string(), &format!("{why} (image {name})")),
                None => {
                    self.pool(&p.storage);
                    Ok(())
                }
            },
        }
    }
}

/// Pure: what the volumes and published images of `vm` ask of its node, or why it cannot
/// be placed yet.
pub fn needs(vm: &VirtualMachine, look: &Lookup<'_>) -> Result<Needs, Blocked> {
    let me = vm.name_any();
    let mut out = Needs::default();
    for d in &vm.spec.disks {
        if let Some(i) = &d.image {
            out.image(look, &i.name, &format!("disk {}", d.name))?;
        }
    }
    let (volume, snapshot) = (look.volume, look.snapshot);
    for name in vm.spec.volumes() {
        let Some(v) = volume(name).filter(|v| v.metadata.deletion_timestamp.is_none()) else {
            return Err(blocked(
                "VolumeNotFound",
                format!("VirtualMachineVolume {name} does not exist"),
            ));
        };
        let st = v.status.clone().unwrap_or_default();
        if let Some(user) = st.user.as_deref().filter(|u| *u != me) {
            return Err(blocked(
                "VolumeInUse",
                format!(
                    "VirtualMachineVolume {name} is used by VM {user}: one VM writes a volume at a time"
                ),
            ));
        }
        let source = v.spec.source.clone().unwrap_or_default();
        // A new volume is made where its source's data is: a published image's copy.
        if let (Some(i), None) = (&source.image, st.allocated_bytes) {
            out.image(look, &i.name, &format!("volume {name}'s source"))?;
        }
        if let Some(pool) = v.spec.pool() {
            out.pool(pool);
            continue;
        }
        if let Some(node) = st.node {
            out.pin(node, &format!("volume {name}"))?;
            continue;
        }
        // A new local volume is made where its source's data is, when that is local.
        if let Some(other) = source.volume {
            let src = volume(&other.name);
            if let Some(node) = src
                .as_ref()
                .filter(|s| s.spec.pool().is_none())
                .and_then(|s| s.status.clone()?.node)
            {
                out.pin(node, &format!("volume {name}'s source {}", other.name))?;
            }
        }
        if let Some(snap) = source.snapshot {
            let Some(s) = snapshot(&snap.name) else {
                return Err(blocked(
                    "VolumeSourceNotFound",
                    format!("VirtualMachineSnapshot {} does not exist", snap.name),
                ));
            };
            let st = s.status.clone().unwrap_or_default();
            if st.phase != Some(SnapshotPhase::Succeeded) {
                return Err(blocked(
                    "VolumeSourceNotReady",
                    format!("VirtualMachineSnapshot {} is not ready to use", snap.name),
                ));
            }
            let local = st
                .volumes
                .iter()
                .any(|c| c.disk == snap.disk && c.storage == crate::api::volume::LOCAL);
            if let (true, Some(node)) = (local, st.node) {
                out.pin(node, &format!("volume {name}'s snapshot {}", snap.name))?;
            }
        }
    }
    Ok(out)
}

/// `needs` on the controller's caches.
pub fn needs_of(ctx: &Context, vm: &VirtualMachine) -> Result<Needs, Blocked> {
    let ns = vm.namespace().unwrap_or_default();
    needs(
        vm,
        &Lookup {
            volume: &|n| ctx.caches.volumes.get(&ObjectRef::new(n).within(&ns)),
            snapshot: &|n| ctx.caches.snapshots.get(&ObjectRef::new(n).within(&ns)),
            image: &|n| ctx.caches.images.get(&ObjectRef::new(n).within(&ns)),
        },
    )
}

/// The controller's part of a volume's status: its node and its user.
async fn write_claim(
    api: &Api<VirtualMachineVolume>,
    v: &VirtualMachineVolume,
    node: Option<&str>,
    user: Option<&str>,
) -> Result<(), kube::Error> {
    let mut status = json!({});
    if let Some(n) = node {
        status["node"] = json!(n);
    }
    if let Some(u) = user {
        status["user"] = json!(u);
    }
    let patch = json!({
        "apiVersion": "vmlet.dev/v1alpha1",
        "kind": "VirtualMachineVolume",
        "metadata": {"resourceVersion": v.resource_version()},
        "status": status,
    });
    api.patch_status(
        &v.name_any(),
        &PatchParams::apply(FIELD_MANAGER),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

/// Makes `vm` the user of each of its volumes (and a new local volume `node`'s), on
/// fresh reads with their resourceVersion as precondition, before the VM is bound: two
/// VMs that want one volume cannot both get it. Err(Blocked) when another VM got there
/// first.
pub async fn claim(
    ctx: &Context,
    vm: &VirtualMachine,
    node: &str,
) -> Result<Result<(), Blocked>, kube::Error> {
    let api: Api<VirtualMachineVolume> =
        Api::namespaced(ctx.client.clone(), &vm.namespace().unwrap_or_default());
    let me = vm.name_any();
    for name in vm.spec.volumes() {
        let Some(v) = api.get_opt(name).await? else {
            return Ok(Err(blocked(
                "VolumeNotFound",
                format!("VirtualMachineVolume {name} does not exist"),
            )));
        };
        let st = v.status.clone().unwrap_or_default();
        if let Some(user) = st.user.as_deref().filter(|u| *u != me) {
            return Ok(Err(blocked(
                "VolumeInUse",
                format!(
                    "VirtualMachineVolume {name} is used by VM {user}: one VM writes a volume at a time"
                ),
            )));
        }
        let local = v.spec.pool().is_none();
        let want_node = match (&st.node, local) {
            (Some(n), _) => Some(n.as_str()),
            (None, true) => Some(node),
            (None, false) => None,
        };
        if st.user.as_deref() == Some(me.as_str()) && st.node.as_deref() == want_node {
            continue;
        }
        write_claim(&api, &v, want_node, Some(&me)).await?;
    }
    Ok(Ok(()))
}

/// A volume's finalizer, and its claim while the claiming VM lasts. On deletion: the
/// finalizer stays while a VM uses it; a volume never made is let go here, one with data
/// by the agent that deletes the data.
pub async fn reconcile(v: Arc<VirtualMachineVolume>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = v.namespace().unwrap_or_default();
    let api: Api<VirtualMachineVolume> = Api::namespaced(ctx.client.clone(), &ns);
    let has_finalizer = v.finalizers().iter().any(|f| f == VOLUME_FINALIZER);
    if v.metadata.deletion_timestamp.is_none() && !has_finalizer {
        crate::patch::add_finalizer(&api, &*v, VOLUME_FINALIZER).await?;
        return Ok(Action::await_change());
    }
    let st = v.status.clone().unwrap_or_default();
    if let Some(user) = &st.user {
        let vms: Api<VirtualMachine> = Api::namespaced(ctx.client.clone(), &ns);
        let holds = vms
            .get_opt(user)
            .await?
            .is_some_and(|vm| vm.spec.volumes().any(|n| n == v.name_any()));
        if !holds {
            tracing::info!(volume = %v.name_any(), vm = %user, "releasing a volume its VM no longer uses");
            write_claim(&api, &v, st.node.as_deref(), None).await?;
            return Ok(Action::await_change());
        }
        return Ok(Action::requeue(Duration::from_secs(60)));
    }
    let never_made = st.allocated_bytes.is_none();
    if v.metadata.deletion_timestamp.is_some() && has_finalizer && never_made {
        crate::patch::remove_finalizer(&api, &*v, VOLUME_FINALIZER).await?;
    }
    Ok(Action::await_change())
}

pub fn error_policy(v: Arc<VirtualMachineVolume>, err: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile_error("volumes", "kube");
    tracing::warn!(volume = %v.name_any(), error = %err, "volume reconcile failed");
    Action::requeue(Duration::from_secs(5))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::image::{PublishedImage, VirtualMachineImageStatus as ImageStatus};
    use crate::api::volume::{
        SnapshotVolume, VirtualMachineSnapshotStatus, VirtualMachineVolumeStatus,
    };

    fn vm(volumes: &[&str]) -> VirtualMachine {
        // "img:NAME" is a disk on image NAME; anything else a volume.
        let disks: Vec<_> = volumes
            .iter()
            .map(|v| match v.strip_prefix("img:") {
                Some(i) => json!({"name": i, "image": {"name": i}}),
                None => json!({"name": v, "volume": {"name": v}}),
            })
            .collect();
        let mut vm = VirtualMachine::new(
            "me",
            serde_json::from_value(json!({"disks": disks})).unwrap(),
        );
        vm.metadata.namespace = Some("ns".into());
        vm
    }

    fn vol(
        name: &str,
        spec: serde_json::Value,
        node: Option<&str>,
        user: Option<&str>,
    ) -> Arc<VirtualMachineVolume> {
        let mut v = VirtualMachineVolume::new(name, serde_json::from_value(spec).unwrap());
        v.status = Some(VirtualMachineVolumeStatus {
            node: node.map(str::to_string),
            user: user.map(str::to_string),
            ..Default::default()
        });
        Arc::new(v)
    }

    #[test]
    fn volumes_decide_where_a_vm_may_run() {
        let vols = [
            vol("free", json!({"size": "1Gi"}), None, None),
            vol("on-a", json!({"size": "1Gi"}), Some("a"), Some("me")),
            vol("on-b", json!({"size": "1Gi"}), Some("b"), None),
            vol("nfs", json!({"size": "1Gi", "storage": "nfs"}), None, None),
            vol("taken", json!({"size": "1Gi"}), Some("a"), Some("other")),
            vol(
                "clone-b",
                json!({"size": "1Gi", "source": {"volume": {"name": "on-b"}}}),
                None,
                None,
            ),
            vol(
                "from-snap",
                json!({"size": "1Gi", "source": {"snapshot": {"name": "s", "disk": "d"}}}),
                None,
                None,
            ),
            vol(
                "from-pending",
                json!({"size": "1Gi", "source": {"snapshot": {"name": "p", "disk": "d"}}}),
                None,
                None,
            ),
        ];
        let mut s = VirtualMachineSnapshot::new(
            "s",
            serde_json::from_value(json!({"vmName": "x"})).unwrap(),
        );
        s.status = Some(VirtualMachineSnapshotStatus {
            phase: Some(SnapshotPhase::Succeeded),
            node: Some("c".into()),
            volumes: vec![SnapshotVolume {
                disk: "d".into(),
                volume: "v".into(),
                storage: "local".into(),
                size_bytes: 1,
            }],
            ..Default::default()
        });
        let image = |name: &str, source: serde_json::Value, published: Option<(&str, &str)>| {
            let spec = json!({"format": "qcow2", "source": source});
            let mut i = VirtualMachineImage::new(name, serde_json::from_value(spec).unwrap());
            i.status = published.map(|(storage, node)| ImageStatus {
                published: Some(PublishedImage {
                    storage: storage.into(),
                    node: node.into(),
                    size_bytes: 1,
                }),
                ..Default::default()
            });
            Arc::new(i)
        };
        let from_vol = json!({"volume": {"name": "v"}});
        let imgs = [
            image("tpl-a", from_vol.clone(), Some(("local", "a"))),
            image("tpl-nfs", from_vol.clone(), Some(("nfs", "b"))),
            image("tpl-wait", from_vol, None),
            image("plain", json!({"hostPath": {"path": "/x"}}), None),
        ];
        let mut made = (*vol(
            "made-from-tpl-a",
            json!({"size": "1Gi", "source": {"image": {"name": "tpl-a"}}}),
            Some("b"),
            None,
        ))
        .clone();
        made.status.as_mut().unwrap().allocated_bytes = Some(1);
        let vols = [
            vols.to_vec(),
            vec![
                vol(
                    "from-tpl-a",
                    json!({"size": "1Gi", "storage": "nfs", "source": {"image": {"name": "tpl-a"}}}),
                    None,
                    None,
                ),
                Arc::new(made),
            ],
        ]
        .concat();
        let mut p = s.clone();
        p.metadata.name = Some("p".into());
        p.status.as_mut().unwrap().phase = Some(SnapshotPhase::InProgress);
        let snaps = [Arc::new(s), Arc::new(p)];
        let volume = |n: &str| vols.iter().find(|v| v.name_any() == n).cloned();
        let snapshot = |n: &str| snaps.iter().find(|v| v.name_any() == n).cloned();
        let image = |n: &str| imgs.iter().find(|v| v.name_any() == n).cloned();
        let ok = |node: Option<&str>, pools: &[&str]| -> Result<Needs, &'static str> {
            Ok(Needs {
                node: node.map(str::to_string),
                pools: pools.iter().map(|p| p.to_string()).collect(),
            })
        };
        for (uses, want) in [
            (vec![], ok(None, &[])),
            (vec!["free"], ok(None, &[])),
            (vec!["on-a"], ok(Some("a"), &[])),
            (vec!["on-a", "nfs", "free"], ok(Some("a"), &["nfs"])),
            (vec!["on-a", "on-b"], Err("VolumeConflict")),
            (vec!["taken"], Err("VolumeInUse")),
            (vec!["missing"], Err("VolumeNotFound")),
            (vec!["clone-b"], ok(Some("b"), &[])),
            (vec!["from-snap"], ok(Some("c"), &[])),
            (vec!["from-snap", "on-a"], Err("VolumeConflict")),
            (vec!["from-pending"], Err("VolumeSourceNotReady")),
            (vec!["img:plain"], ok(None, &[])),
            (vec!["img:tpl-a"], ok(Some("a"), &[])),
            (vec!["img:tpl-a", "on-b"], Err("VolumeConflict")),
            (vec!["img:tpl-nfs", "on-a"], ok(Some("a"), &["nfs"])),
            (vec!["img:tpl-wait"], Err("ImageNotPublished")),
            (vec!["from-tpl-a"], ok(Some("a"), &["nfs"])),
            (vec!["made-from-tpl-a"], ok(Some("b"), &[])),
        ] {
            let look = Lookup {
                volume: &volume,
                snapshot: &snapshot,
                image: &image,
            };
            let got = needs(&vm(&uses), &look).map_err(|b| b.reason);
            assert_eq!(got, want, "{uses:?}");
        }
    }
}
