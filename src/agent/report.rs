//! The node's Hypervisor object and Lease: capacity, allocatable, allocated, accel,
//! versions, Ready, and a heartbeat the controller reads as liveness.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

use super::render::Hardware;
use super::{Context, FIELD_MANAGER};
use crate::api::conditions;
use crate::api::hypervisor::Resources;
use crate::api::quantity::{Bytes, parse_bytes};
use crate::api::{Hypervisor, HypervisorStatus};

use crate::api::{
    HEARTBEAT_LEASE_NAMESPACE as LEASE_NAMESPACE, heartbeat_lease_name as lease_name,
};

/// allocatable = capacity x overcommit - reserved (memory), floored at zero and, for
/// memory, to whole MiB.
pub fn allocatable(
    cpus: u32,
    memory: u64,
    cpu_ratio: f64,
    mem_ratio: f64,
    reserved: u64,
) -> (u32, u64) {
    let cpu = (f64::from(cpus) * cpu_ratio).floor() as u32;
    let mem = ((memory as f64 * mem_ratio).floor() as u64).saturating_sub(reserved);
    // Whole MiB: guests are sized in MiB, and the status reads better.
    let mem = mem & !((1 << 20) - 1);
    (cpu, mem)
}

/// The Node this agent runs for, as an owner reference: its Hypervisor and Lease are
/// garbage-collected with it, so a decommissioned node leaves no silent hypervisor behind
/// (the controller's node-loss guard and the agents' fencing majority count them).
/// Reads this node's Node object for its uid (remembered in the Context): the owner the
/// Hypervisor and the Lease name.
async fn read_node_uid(ctx: &Context) -> Option<String> {
    let uid = match Api::<k8s_openapi::api::core::v1::Node>::all(ctx.client.clone())
        .get_opt(&ctx.node)
        .await
    {
        Ok(n) => n.and_then(|n| n.metadata.uid),
        Err(e) => {
            tracing::debug!(error = %e, "cannot read this node's Node object");
            None
        }
    };
    *ctx.node_uid.lock().expect("not poisoned") = uid.clone();
    uid
}

fn node_owner(node: &str, uid: &str) -> serde_json::Value {
    json!([{"apiVersion": "v1", "kind": "Node", "name": node, "uid": uid}])
}

async fn report(ctx: &Context) -> anyhow::Result<()> {
    let api: Api<Hypervisor> = Api::all(ctx.client.clone());
    let info = ctx.lv.node_info().await?;
    let current = api.get_opt(&ctx.node).await?;
    ensure_object(ctx, &api, current.as_ref()).await?;
    let spec = current.as_ref().map(|h| h.spec.clone()).unwrap_or_default();
    let reserved = match &spec.reserved_memory {
        Some(r) => parse_bytes(r)?,
        None => parse_bytes(&ctx.args.reserved_memory)?,
    };
    let (cpu_ratio, memory_ratio) = spec.ratios();
    let (cpu, mem) = allocatable(
        info.cpus,
        info.memory_bytes,
        cpu_ratio,
        memory_ratio,
        reserved,
    );
    let (used_cpu, used_mem, count) = allocated(ctx);
    let (overhead, overhead_source) = &ctx.overhead;
    let used_mem = used_mem.saturating_add(overhead.of(count as u64, used_cpu, used_mem));
    let old = current.and_then(|h| h.status).unwrap_or_default();
    let now = Time(Timestamp::now());
    let status = HypervisorStatus {
        capacity: Some(Resources {
            cpu: i64::from(info.cpus),
            memory: Bytes(info.memory_bytes).to_string(),
        }),
        allocatable: Some(Resources {
            cpu: i64::from(cpu),
            memory: Bytes(mem).to_string(),
        }),
        allocated: Some(Resources {
            cpu: used_cpu,
            memory: Bytes(used_mem).to_string(),
        }),
        vm_overhead: Some(overhead.to_status(overhead_source)),
        accel: Some(ctx.facts.accel.as_str().to_string()),
        accel_reason: Some(ctx.accel_reason.clone()),
        libvirt_version: Some(info.libvirt_version),
        hypervisor_version: Some(info.hypervisor_version),
        uefi: Some(ctx.facts.uefi),
        agent_url: ctx.agent_url.clone(),
        stream_address: ctx.stream_address.clone(),
        migration_uri: ctx.args.migration_uri.clone(),
        state_dir: Some(ctx.facts.state_dir.display().to_string()),
        image_root: Some(ctx.args.image_root.display().to_string()),
        storage_pools: ctx
            .pools
            .iter()
            .map(|(name, path)| crate::api::hypervisor::StoragePool {
                name: name.clone(),
                path: path.display().to_string(),
            })
            .collect(),
        vms: Some(count),
        conditions: vec![conditions::new(
            &old.conditions,
            conditions::Type::Ready,
            true,
            "AgentReady",
            format!(
                "libvirt {} reachable; guests use {}",
                ctx.lv.uri(),
                ctx.facts.accel.as_str()
            ),
            None,
            now,
        )],
    };
    write_status(ctx, &api, &old, status).await
}

/// Creates the Hypervisor when there is none, and makes its Node its owner (garbage
/// collected with it) once the Node can be read. The Node is read only while the
/// Hypervisor names no owner (every report would otherwise cost a GET).
async fn ensure_object(
    ctx: &Context,
    api: &Api<Hypervisor>,
    current: Option<&Hypervisor>,
) -> anyhow::Result<()> {
    let owner_uid = current.and_then(|h| {
        h.metadata
            .owner_references
            .as_ref()?
            .iter()
            .find(|r| r.kind == "Node" && r.name == ctx.node)
            .map(|r| r.uid.clone())
    });
    let owned = owner_uid.is_some();
    let node_uid = match owner_uid {
        Some(uid) => {
            *ctx.node_uid.lock().expect("not poisoned") = Some(uid.clone());
            Some(uid)
        }
        None => read_node_uid(ctx).await,
    };
    if current.is_none() || (node_uid.is_some() && !owned) {
        let mut meta = json!({"name": ctx.node});
        if let Some(uid) = &node_uid {
            meta["ownerReferences"] = node_owner(&ctx.node, uid);
        }
        let obj = json!({"apiVersion": "vmlet.dev/v1alpha1", "kind": "Hypervisor", "metadata": meta, "spec": {}});
        api.patch(
            &ctx.node,
            &PatchParams::apply(FIELD_MANAGER),
            &Patch::Apply(&obj),
        )
        .await?;
    }
    Ok(())
}

/// CPUs, memory and the number of the VMs bound here, as their specs ask.
fn allocated(ctx: &Context) -> (i64, u64, i32) {
    let (mut used_cpu, mut used_mem, mut count) = (0i64, 0u64, 0i32);
    for vm in ctx.vms.state() {
        let class = vm.spec.class_ref.as_ref().and_then(|r| {
            ctx.classes
                .get(&kube::runtime::reflector::ObjectRef::new(&r.name))
        });
        if let Ok(hw) = Hardware::resolve(&vm.spec, class.as_ref().map(|c| &c.spec)) {
            used_cpu += i64::from(hw.vcpus());
            used_mem += hw.memory_bytes;
        }
        count += 1;
    }
    (used_cpu, used_mem, count)
}

/// Applies the Hypervisor status when it differs from what is there.
async fn write_status(
    ctx: &Context,
    api: &Api<Hypervisor>,
    old: &HypervisorStatus,
    status: HypervisorStatus,
) -> anyhow::Result<()> {
    if status != *old {
        let patch =
            json!({"apiVersion": "vmlet.dev/v1alpha1", "kind": "Hypervisor", "status": status});
        api.patch_status(
            &ctx.node,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
    }
    Ok(())
}

/// Ready=False with `reason`, the rest of the status as it was (a server-side apply that
/// left fields out would remove them).
async fn report_unready(ctx: &Context, reason: &str, message: String) -> anyhow::Result<()> {
    let api: Api<Hypervisor> = Api::all(ctx.client.clone());
    let Some(current) = api.get_opt(&ctx.node).await? else {
        return Ok(());
    };
    let old = current.status.unwrap_or_default();
    let ready = conditions::new(
        &old.conditions,
        conditions::Type::Ready,
        false,
        reason,
        message,
        None,
        Time(Timestamp::now()),
    );
    let status = HypervisorStatus {
        conditions: vec![ready],
        ..old.clone()
    };
    write_status(ctx, &api, &old, status).await
}

async fn heartbeat(ctx: &Context) -> anyhow::Result<()> {
    let api: Api<Lease> = Api::namespaced(ctx.client.clone(), LEASE_NAMESPACE);
    let name = lease_name(&ctx.node);
    let mut meta = json!({"name": name, "labels": {crate::api::HEARTBEAT_LABEL: ctx.node}});
    // Every apply names the owner: one that left it out would remove it (server-side
    // apply), and a Lease whose Node is then deleted would never be collected.
    let known = ctx.node_uid.lock().expect("not poisoned").clone();
    let uid = match known {
        Some(uid) => Some(uid),
        None => read_node_uid(ctx).await,
    };
    if let Some(uid) = uid {
        meta["ownerReferences"] = node_owner(&ctx.node, &uid);
    }
    let lease = json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": meta,
        "spec": LeaseSpec {
            holder_identity: Some(ctx.node.clone()),
            lease_duration_seconds: Some(ctx.args.lease_duration_seconds as i32),
            renew_time: Some(MicroTime(Timestamp::now())),
            ..Default::default()
        },
    });
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&lease),
    )
    .await?;
    Ok(())
}

/// Writes the Hypervisor status every other heartbeat (it changes slowly and is only
/// written when it changed).
pub async fn hypervisor_loop(ctx: Arc<Context>) {
    let _ = ctx.vms.wait_until_ready().await;
    loop {
        let res = match ctx.lv.down() {
            // The scheduler places nothing on a Hypervisor that is not Ready.
            Some(why) => report_unready(&ctx, "LibvirtUnreachable", why).await,
            None => report(&ctx).await,
        };
        if let Err(e) = res {
            tracing::warn!(error = %e, "hypervisor report failed");
        }
        tokio::time::sleep(Duration::from_secs(2 * ctx.args.heartbeat_seconds.max(1))).await;
    }
}

/// Renews the Lease, and fences: once `fence_after` passes without a successful renewal,
/// every domain this agent owns is destroyed, and none is started until a renewal works
/// again, unless its peers show the API server is down for a majority (an outage, see
/// `peers`). A renewal attempt may hang (an unreachable API server); the watchdog does not
/// wait for it.
pub async fn heartbeat_loop(ctx: Arc<Context>) {
    let period = Duration::from_secs(ctx.args.heartbeat_seconds.max(1));
    let fence_after = Duration::from_secs(ctx.args.fence_after_seconds);
    let renew = async {
        loop {
            match tokio::time::timeout(period, heartbeat(&ctx)).await {
                Ok(Ok(())) => {
                    *ctx.last_renewal.lock().expect("not poisoned") = std::time::Instant::now();
                    if ctx.fenced.swap(false, std::sync::atomic::Ordering::SeqCst) {
                        tracing::warn!("lease renewed again: fencing lifted");
                    }
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "lease renewal failed"),
                Err(_) => tracing::warn!("lease renewal timed out"),
            }
            tokio::time::sleep(period).await;
        }
    };
    let watchdog = async {
        let mut in_outage = false;
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let silent = ctx.last_renewal.lock().expect("not poisoned").elapsed();
            if fence_after.is_zero() || silent < fence_after {
                in_outage = false;
                continue;
            }
            if ctx.fenced.load(std::sync::atomic::Ordering::SeqCst) {
                continue;
            }
            if peers_see_an_outage(&ctx).await {
                if !in_outage {
                    tracing::error!(
                        silent_s = silent.as_secs_f64(),
                        "no lease renewal, but a majority of hypervisors cannot reach the API server either: an outage, not fencing"
                    );
                    ctx.metrics.fence_skipped();
                }
                in_outage = true;
                // Ask again soon: a peer that reaches the API server again means fence.
                tokio::time::sleep(Duration::from_secs(2)).await;
                continue;
            }
            tracing::error!(
                silent_s = silent.as_secs_f64(),
                "no lease renewal: fencing, destroying this node's domains"
            );
            fence(&ctx).await;
        }
    };
    tokio::join!(renew, watchdog);
}

/// Asks the other hypervisors' agents whether they reach the API server (see `peers`).
async fn peers_see_an_outage(ctx: &Context) -> bool {
    let Some(key) = &ctx.peer_key else {
        return false;
    };
    let all = ctx.hypervisors.state();
    let peers: Vec<(String, String)> = all
        .iter()
        .filter_map(|h| {
            let name = h.metadata.name.clone()?;
            let url = h.status.as_ref()?.agent_url.clone()?;
            (name != ctx.node).then_some((name, url))
        })
        .collect();
    // Every Hypervisor counts, with or without an address: fewer answers only make
    // fencing likelier. This node counts even before its own object is cached.
    let total = all
        .iter()
        .filter(|h| h.metadata.name.as_deref() != Some(ctx.node.as_str()))
        .count()
        + 1;
    let answers = super::peers::ask(&ctx.http, key, &peers).await;
    let verdict = super::peers::decide(total, &answers);
    tracing::info!(total, ?answers, ?verdict, "asked peers before fencing");
    verdict == super::peers::Verdict::Outage
}

async fn fence(ctx: &Context) {
    // Under the reconcile lock: a reconcile either started its domain before (and it is
    // destroyed here) or sees the flag after (and starts nothing).
    let _gate = ctx.fence_gate.write().await;
    ctx.fenced.store(true, std::sync::atomic::Ordering::SeqCst);
    // Not being able to list the domains is no reason to think there are none: retry
    // until the list works (or a renewal lifts the fence).
    let domains = loop {
        match ctx.lv.list().await {
            Ok(d) => break d,
            Err(e) => {
                tracing::error!(error = %e, "fencing cannot list domains; retrying");
                if !ctx.fenced.load(std::sync::atomic::Ordering::SeqCst) {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    for d in domains {
        let ours = d.owner.as_ref().is_some_and(|o| o.node == ctx.node);
        if ours && let Err(e) = ctx.lv.destroy(&d.uuid).await {
            tracing::error!(domain = %d.name, error = %e, "fencing could not destroy a domain");
        }
    }
    ctx.metrics.fenced();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocatable_applies_ratio_then_reserve() {
        assert_eq!(allocatable(8, 16 << 30, 4.0, 1.0, 1 << 30), (32, 15 << 30));
        assert_eq!(allocatable(2, 1 << 30, 1.5, 1.0, 2 << 30), (3, 0));
        assert_eq!(allocatable(1, (1 << 30) + 12345, 1.0, 1.0, 0), (1, 1 << 30));
    }
}
