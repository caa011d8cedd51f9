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
use crate::api::{VOLUME_FINALIZER, VirtualMachine};

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

/// Pure: what the volumes of `vm` ask of its node, or why it cannot be placed yet.
pub fn needs(
    vm: &VirtualMachine,
    volume: &dyn Fn(&str) -> Option<Arc<VirtualMachineVolume>>,
    snapshot: &dyn Fn(&str) -> Option<Arc<VirtualMachineSnapshot>>,
) -> Result<Needs, Blocked> {
    let me = vm.name_any();
    let mut out = Needs::default();
    let mut pin = |node: String, why: &str| -> Result<(), Blocked> {
        match &out.node {
            Some(n) if *n != node => Err(blocked(
                "VolumeConflict",
                format!("{why} lives on node {node}, another local volume on {n}"),
            )),
            _ => {
                out.node = Some(node);
                Ok(())
            }
        }
    };
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
        if let Some(pool) = v.spec.pool() {
            if !out.pools.iter().any(|p| p == pool) {
                out.pools.push(pool.to_string());
            }
            continue;
        }
        if let Some(node) = st.node {
            pin(node, &format!("volume {name}"))?;
            continue;
        }
        // A new local volume is made where its source's data is, when that is local.
        let source = v.spec.source.clone().unwrap_or_default();
        if let Some(other) = source.volume {
            let src = volume(&other.name);
            if let Some(node) = src
                .as_ref()
                .filter(|s| s.spec.pool().is_none())
                .and_then(|s| s.status.clone()?.node)
            {
                pin(node, &format!("volume {name}'s source {}", other.name))?;
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
                pin(node, &format!("volume {name}'s snapshot {}", snap.name))?;
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
        &|n| ctx.caches.volumes.get(&ObjectRef::new(n).within(&ns)),
        &|n| ctx.caches.snapshots.get(&ObjectRef::new(n).within(&ns)),
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
    use crate::api::volume::{
        SnapshotVolume, VirtualMachineSnapshotStatus, VirtualMachineVolumeStatus,
    };

    fn vm(volumes: &[&str]) -> VirtualMachine {
        let disks: Vec<_> = volumes
            .iter()
            .map(|v| json!({"name": v, "volume": {"name": v}}))
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
        let mut p = s.clone();
        p.metadata.name = Some("p".into());
        p.status.as_mut().unwrap().phase = Some(SnapshotPhase::InProgress);
        let snaps = [Arc::new(s), Arc::new(p)];
        let volume = |n: &str| vols.iter().find(|v| v.name_any() == n).cloned();
        let snapshot = |n: &str| snaps.iter().find(|v| v.name_any() == n).cloned();
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
        ] {
            let got = needs(&vm(&uses), &volume, &snapshot).map_err(|b| b.reason);
            assert_eq!(got, want, "{uses:?}");
        }
    }
}
