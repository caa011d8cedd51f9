//! `kubectl vm drain NODE`: cordon the node, then move each VM off it as its
//! evictionStrategy says. LiveMigrate: a VirtualMachineMigration (the controller holds
//! them to its per-node and per-cluster limits; the disks travel with the guest).
//! Shutdown: the node's agent stops the VM, the controller unbinds it and it starts
//! wherever it is scheduled next; members of an anti-affinity group go one at a time, each
//! back up before the next goes down. A VM whose disks hold data only this node has is
//! not shut down to move (it would start elsewhere on empty disks) unless its
//! failoverPolicy is RestartWithNewDisks. None: left where it is. What stays is said.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams, Patch, PostParams, ResourceExt};
use serde_json::json;

use crate::api::{EVICT_ANNOTATION, MigrationPhase, VirtualMachine, VirtualMachineMigration};

const FIELD_MANAGER: &str = "kubectl-vm";

pub use crate::api::eviction::{Plan, plan, why_stays};

fn key(vm: &VirtualMachine) -> String {
    format!("{}/{}", vm.namespace().unwrap_or_default(), vm.name_any())
}

async fn on_node(client: &kube::Client, node: &str) -> anyhow::Result<Vec<VirtualMachine>> {
    let api: Api<VirtualMachine> = Api::all(client.clone());
    Ok(api
        .list(&ListParams::default().fields(&format!("status.nodeName={node}")))
        .await?
        .items)
}

async fn evict(client: &kube::Client, vm: &VirtualMachine, node: &str) -> anyhow::Result<()> {
    let api: Api<VirtualMachine> =
        Api::namespaced(client.clone(), &vm.namespace().unwrap_or_default());
    crate::patch::annotate(&api, vm, EVICT_ANNOTATION, Some(node), FIELD_MANAGER).await?;
    Ok(())
}

async fn migrate(client: &kube::Client, vm: &VirtualMachine) -> anyhow::Result<()> {
    let ns = vm.namespace().unwrap_or_default();
    let api: Api<VirtualMachineMigration> = Api::namespaced(client.clone(), &ns);
    let under_way = api
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .any(|m| {
            m.spec.vm_name == vm.name_any()
                && !m
                    .status
                    .as_ref()
                    .and_then(|s| s.phase)
                    .is_some_and(MigrationPhase::finished)
        });
    if under_way {
        return Ok(());
    }
    let mut m = VirtualMachineMigration::new(
        "",
        serde_json::from_value(json!({"vmName": vm.name_any()}))?,
    );
    m.metadata.name = None;
    m.metadata.generate_name = Some(format!("drain-{}-", vm.name_any()));
    api.create(&PostParams::default(), &m).await?;
    Ok(())
}

/// The volumes kept on shared pools, as namespace/name: their VMs can move with them.
async fn pooled_volumes(
    client: &kube::Client,
) -> anyhow::Result<std::collections::BTreeSet<String>> {
    Ok(Api::<crate::api::VirtualMachineVolume>::all(client.clone())
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .filter(|v| v.spec.pool().is_some())
        .map(|v| format!("{}/{}", v.namespace().unwrap_or_default(), v.name_any()))
        .collect())
}

/// Whether every migration asked for this VM has failed (the VM is still here).
async fn migrations_failed(client: &kube::Client, vm: &VirtualMachine) -> anyhow::Result<bool> {
    let ns = vm.namespace().unwrap_or_default();
    Ok(
        Api::<VirtualMachineMigration>::namespaced(client.clone(), &ns)
            .list(&ListParams::default())
            .await?
            .items
            .iter()
            .filter(|m| m.spec.vm_name == vm.name_any())
            .all(|m| m.status.as_ref().and_then(|s| s.phase) == Some(MigrationPhase::Failed)),
    )
}

pub async fn drain(client: &kube::Client, node: &str, timeout: Duration) -> anyhow::Result<String> {
    let nodes: Api<Node> = Api::all(client.clone());
    nodes
        .patch(
            node,
            &crate::patch::by(FIELD_MANAGER),
            &Patch::Merge(&json!({"spec": {"unschedulable": true}})),
        )
        .await?;
    eprintln!("node/{node} cordoned");
    let start = Instant::now();
    let mut stay = BTreeMap::new();
    // Shutdown-path VMs with anti-affinity wait their turn, one at a time.
    let mut serial: Vec<String> = Vec::new();
    let mut acted: std::collections::BTreeSet<String> = Default::default();
    loop {
        let vms = on_node(client, node).await?;
        let pooled = pooled_volumes(client).await?;
        let shared_of = |vm: &VirtualMachine| {
            let ns = vm.namespace().unwrap_or_default();
            let pooled = &pooled;
            move |v: &str| pooled.contains(&format!("{ns}/{v}"))
        };
        let plan = |vm: &VirtualMachine| plan(vm, &shared_of(vm));
        let moving: Vec<&VirtualMachine> = vms
            .iter()
            .filter(|vm| {
                if let Plan::Stay(why) = plan(vm) {
                    stay.insert(key(vm), why_stays(vm, why, &shared_of(vm)));
                    false
                } else {
                    true
                }
            })
            .collect();
        if moving.is_empty() {
            break;
        }
        if start.elapsed() > timeout {
            let left: Vec<String> = moving.iter().map(|vm| key(vm)).collect();
            anyhow::bail!(
                "drain of {node} timed out after {} s; still there: {}",
                timeout.as_secs(),
                left.join(", ")
            );
        }
        // An anti-affinity member is down (shut down here, not yet running elsewhere)
        // while this is Some: no other member goes down meanwhile.
        let member_down = serial
            .last()
            .is_some_and(|k| moving.iter().any(|vm| key(vm) == *k && acted.contains(k)));
        for vm in &moving {
            let k = key(vm);
            if acted.contains(&k) {
                continue;
            }
            match plan(vm) {
                Plan::Migrate => {
                    migrate(client, vm).await?;
                    eprintln!("{k}: live migration requested");
                }
                Plan::ShutDown if !vm.spec.anti_affinity.is_empty() && member_down => continue,
                Plan::ShutDown => {
                    evict(client, vm, node).await?;
                    if !vm.spec.anti_affinity.is_empty() {
                        serial.push(k.clone());
                    }
                    eprintln!("{k}: shutting down to start elsewhere");
                }
                Plan::Stay(_) => continue,
            }
            acted.insert(k.clone());
            if !vm.spec.anti_affinity.is_empty() && plan(vm) == Plan::ShutDown {
                break;
            }
        }
        // A migration that failed is asked for again (the VM is still here).
        for vm in &moving {
            if plan(vm) == Plan::Migrate && migrations_failed(client, vm).await? {
                acted.remove(&key(vm));
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let mut out = format!(
        "node/{node} drained in {:.1} s",
        start.elapsed().as_secs_f64()
    );
    for (k, why) in stay {
        out.push_str(&format!("\n{k}: left on the node ({why})"));
    }
    Ok(out)
}
