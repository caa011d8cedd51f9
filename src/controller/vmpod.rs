//! VM Pods: every bound VM has one Pod on its node that stands for it in Kubernetes'
//! own machinery. Its requests are what the VM costs the host, so kube-scheduler, the
//! kubelet's admission and ResourceQuota count the VM; its container only holds a place
//! (QEMU runs under the node's libvirtd). vmlet's scheduler places VMs and, with them,
//! their Pods: a Pod is created already bound (`spec.nodeName`), after the decision and
//! before the VM's binding, so that a quota refusal stops the VM before it is bound.
//!
//! Pure parts decide (sizing, the Pod, what to do about a VM's Pods); the rest writes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, Pod, PodSecurityContext, PodSpec, PodStatus, ResourceRequirements,
    SeccompProfile, SecurityContext, Toleration,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ObjectMeta, PostParams, Preconditions};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;

use crate::api::VirtualMachine;
use crate::api::overhead::Overhead;
use crate::api::quantity::parse_bytes;
use crate::api::vmpod::{
    CONTAINER, PLACEHOLDER_COMMAND, POD_FINALIZER, SCHEDULER_NAME, VM_LABEL, VM_UID_LABEL, pod_name,
};

/// What a VM Pod requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Sizing {
    pub cpu_millis: i64,
    pub memory: u64,
}

/// What a VM with `vcpus` and `guest` bytes of memory costs a node whose overhead
/// formula and (cpu, memory) overcommit ratios are given, in a Pod's terms:
///
///   cpu    = ceil(1000 m x vcpus / r_cpu)
///   memory = ceil((guest + overhead(1, vcpus, guest)) / r_mem)
///
/// so that a node's VM Pods add up to what vmlet's scheduler charges against its
/// allocatable (docs/scheduling.md), and the kubelet's allocatable holds as many VMs as
/// the Hypervisor's does.
pub fn sizing(vcpus: i64, guest: u64, overhead: &Overhead, ratios: (f64, f64)) -> Sizing {
    let (r_cpu, r_mem) = (ratios.0.max(0.001), ratios.1.max(0.001));
    let vcpus = vcpus.max(1);
    let host = guest.saturating_add(overhead.of(1, vcpus, guest));
    Sizing {
        cpu_millis: (vcpus as f64 * 1000.0 / r_cpu).ceil() as i64,
        memory: (host as f64 / r_mem).ceil() as u64,
    }
}

/// A Pod's CPU request in vmlet's units on a node with CPU ratio `r_cpu`: the vCPUs it
/// keeps from VMs (rounded up).
pub fn vcpu_equivalent(cpu_millis: i64, r_cpu: f64) -> i64 {
    (cpu_millis.max(0) as f64 * r_cpu / 1000.0).ceil() as i64
}

/// A CPU quantity in millicores ("250m", "2", "0.5"); None when unreadable.
pub fn parse_cpu_millis(q: &str) -> Option<i64> {
    let q = q.trim();
    if let Some(m) = q.strip_suffix('m') {
        return m.parse::<i64>().ok();
    }
    let cores: f64 = q.parse().ok()?;
    (cores.is_finite() && cores >= 0.0).then(|| (cores * 1000.0).ceil() as i64)
}

/// What a Pod asks of its node, as the kubelet and kube-scheduler count it: the larger of
/// its containers' sum and its largest init container, plus the Pod's overhead; pod-level
/// requests, when set, instead of the containers'.
pub fn pod_requests(pod: &Pod) -> Sizing {
    let of = |r: Option<&ResourceRequirements>| -> Sizing {
        let req = r.and_then(|r| r.requests.as_ref());
        Sizing {
            cpu_millis: req
                .and_then(|m| m.get("cpu"))
                .and_then(|q| parse_cpu_millis(&q.0))
                .unwrap_or(0),
            memory: req
                .and_then(|m| m.get("memory"))
                .and_then(|q| parse_bytes(&q.0).ok())
                .unwrap_or(0),
        }
    };
    let Some(spec) = pod.spec.as_ref() else {
        return Sizing::default();
    };
    let mut total = if let Some(r) = spec.resources.as_ref() {
        of(Some(r))
    } else {
        let mut sum = Sizing::default();
        for c in &spec.containers {
            let s = of(c.resources.as_ref());
            sum.cpu_millis += s.cpu_millis;
            sum.memory = sum.memory.saturating_add(s.memory);
        }
        for c in spec.init_containers.iter().flatten() {
            let s = of(c.resources.as_ref());
            sum.cpu_millis = sum.cpu_millis.max(s.cpu_millis);
            sum.memory = sum.memory.max(s.memory);
        }
        sum
    };
    if let Some(o) = spec.overhead.as_ref() {
        let s = of(Some(&ResourceRequirements {
            requests: Some(o.clone()),
            ..Default::default()
        }));
        total.cpu_millis += s.cpu_millis;
        total.memory = total.memory.saturating_add(s.memory);
    }
    total
}

/// Whether a Pod still holds its node's resources (bound, not finished).
pub fn holds_node(pod: &Pod) -> Option<&str> {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded" | "Failed")) {
        return None;
    }
    pod.spec.as_ref().and_then(|s| s.node_name.as_deref())
}

/// Taints a VM Pod always tolerates: the node's health is vmlet's to judge (its agent's
/// heartbeat and the fencing rule, docs/reliability.md), not the kubelet's, whose
/// absence does not stop guests under libvirtd. Without these the taint manager would
/// evict the Pods of a node whose kubelet is down while its VMs still run.
const ALWAYS_TOLERATED: [&str; 2] = [
    "node.kubernetes.io/not-ready",
    "node.kubernetes.io/unreachable",
];

/// The VM Pod of `vm` on `node`, requesting `sizing`, its container from `image`.
pub fn desired(vm: &VirtualMachine, node: &str, sizing: Sizing, image: &str) -> Pod {
    let name = vm.name_any();
    let uid = vm.uid().unwrap_or_default();
    let user = vm.spec.pod_metadata.clone().unwrap_or_default();
    let mut labels = user.labels;
    labels.retain(|k, _| !k.starts_with("vmlet.dev/"));
    labels.insert(VM_LABEL.into(), name.clone());
    labels.insert(VM_UID_LABEL.into(), uid.clone());
    labels.insert("app.kubernetes.io/managed-by".into(), "vmlet".into());
    let mut tolerations: Vec<Toleration> = vm.spec.tolerations.clone();
    for key in ALWAYS_TOLERATED {
        tolerations.push(Toleration {
            key: Some(key.into()),
            operator: Some("Exists".into()),
            ..Default::default()
        });
    }
    let requests = BTreeMap::from([
        (
            "cpu".to_string(),
            Quantity(format!("{}m", sizing.cpu_millis)),
        ),
        ("memory".to_string(), Quantity(sizing.memory.to_string())),
    ]);
    Pod {
        metadata: ObjectMeta {
            name: Some(pod_name(&name, &uid, node)),
            namespace: vm.namespace(),
            labels: Some(labels),
            annotations: (!user.annotations.is_empty()).then_some(user.annotations),
            finalizers: Some(vec![POD_FINALIZER.into()]),
            owner_references: Some(vec![OwnerReference {
                api_version: "vmlet.dev/v1alpha1".into(),
                kind: "VirtualMachine".into(),
                name,
                uid,
                controller: Some(true),
                block_owner_deletion: Some(true),
            }]),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: Some(node.to_string()),
            scheduler_name: Some(SCHEDULER_NAME.into()),
            priority_class_name: vm.spec.priority_class_name.clone(),
            node_selector: (!vm.spec.node_selector.is_empty())
                .then(|| vm.spec.node_selector.clone()),
            tolerations: Some(tolerations),
            restart_policy: Some("Always".into()),
            // The guest's shutdown is the agent's (spec.terminationGracePeriodSeconds
            // bounds it); the placeholder has nothing to finish.
            termination_grace_period_seconds: Some(0),
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(65532),
                run_as_group: Some(65532),
                seccomp_profile: Some(SeccompProfile {
                    type_: "RuntimeDefault".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            containers: vec![Container {
                name: CONTAINER.into(),
                image: Some(image.to_string()),
                image_pull_policy: Some("IfNotPresent".into()),
                command: Some(vec![PLACEHOLDER_COMMAND.into()]),
                // Memory limited at the request: a quota on limits.memory counts the VM,
                // and a LimitRange's default limit (possibly below the VM) is not put
                // on it. No CPU limit: with it the Pod would be Guaranteed, and a static
                // CPU manager would give the idle placeholder whole cores.
                resources: Some(ResourceRequirements {
                    limits: Some(BTreeMap::from([(
                        "memory".to_string(),
                        requests["memory"].clone(),
                    )])),
                    requests: Some(requests),
                    ..Default::default()
                }),
                security_context: Some(SecurityContext {
                    allow_privilege_escalation: Some(false),
                    read_only_root_filesystem: Some(true),
                    capabilities: Some(Capabilities {
                        drop: Some(vec!["ALL".into()]),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        }),
        status: None,
    }
}

/// One thing to do about a VM's Pods.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// The VM is bound and its node has no Pod of it: create one.
    Create,
    /// A Pod on a node the VM is not bound to (it moved, or was unbound): delete it
    /// (releasing it first when it holds the controller's finalizer).
    Delete { name: String, uid: String },
    /// The Pod on the VM's node is being deleted (by hand, or evicted by a drain): the VM
    /// must leave the node as its evictionStrategy says; the Pod waits for it.
    Evict { name: String },
    /// A deleted Pod whose VM has left its node: the controller's finalizer goes, and
    /// the Pod with it.
    Release { name: String, uid: String },
    /// The kubelet of the VM's node refused its Pod (admission: not enough memory or
    /// CPU, a taint, a selector): delete it and place the VM again, saying why.
    Refused {
        name: String,
        uid: String,
        reason: String,
        message: String,
    },
}

/// Whether `pod` is a VM Pod: its controller is the VirtualMachine its uid label names.
/// The label alone proves nothing: anyone who may create Pods can set it.
pub fn is_vm_pod(pod: &Pod) -> Option<&str> {
    let uid = pod.metadata.labels.as_ref()?.get(VM_UID_LABEL)?;
    pod.metadata
        .owner_references
        .iter()
        .flatten()
        .any(|o| {
            o.controller == Some(true)
                && o.kind == "VirtualMachine"
                && o.api_version == "vmlet.dev/v1alpha1"
                && o.uid == *uid
        })
        .then_some(uid.as_str())
}

/// Kubelet reasons for refusing a Pod at admission (not for ending one that ran, such
/// as a node-pressure eviction or a node shutdown).
pub fn admission_refusal(reason: &str) -> bool {
    reason.starts_with("OutOf")
        || matches!(
            reason,
            "NodeAffinity"
                | "NodeName"
                | "Taint"
                | "UnexpectedAdmissionError"
                | "PodOSNotSupported"
        )
}

/// Pure: what to do about the Pods of a VM bound to `node` (None: unbound), given the
/// Pods that stand for it now (only those of `vm_uid` count).
pub fn plan(vm_uid: &str, node: Option<&str>, pods: &[&Pod]) -> Vec<Step> {
    let mut steps = Vec::new();
    let mut present = false;
    for pod in pods.iter().filter(|p| is_vm_pod(p) == Some(vm_uid)) {
        let name = pod.name_any();
        let uid = pod.uid().unwrap_or_default();
        let on = pod.spec.as_ref().and_then(|s| s.node_name.as_deref());
        let status = pod.status.clone().unwrap_or_default();
        let going = pod.metadata.deletion_timestamp.is_some();
        let held = holds_finalizer(pod);
        if on.is_some() && on == node {
            present = true;
            if going {
                if held {
                    steps.push(Step::Evict { name });
                }
                continue;
            }
            match status.phase.as_deref() {
                Some("Failed") if admission_refusal(status.reason.as_deref().unwrap_or("")) => {
                    steps.push(refused(name, uid, &status))
                }
                // Ended otherwise (evicted for node pressure, node shut down): it goes,
                // and the VM's next reconcile puts a new one in its place.
                Some("Failed") => steps.push(Step::Delete { name, uid }),
                // The placeholder never ends by itself: ended, it stands for nothing.
                Some("Succeeded") => steps.push(Step::Delete { name, uid }),
                _ => {}
            }
        } else if !going {
            steps.push(Step::Delete { name, uid });
        } else if held {
            steps.push(Step::Release { name, uid });
        }
    }
    if node.is_some() && !present {
        steps.push(Step::Create);
    }
    steps
}

/// Whether the Pod still holds the controller's finalizer.
pub fn holds_finalizer(pod: &Pod) -> bool {
    pod.metadata
        .finalizers
        .iter()
        .flatten()
        .any(|f| f == POD_FINALIZER)
}

fn refused(name: String, uid: String, status: &PodStatus) -> Step {
    Step::Refused {
        name,
        uid,
        reason: status.reason.clone().unwrap_or_else(|| "Failed".into()),
        message: status.message.clone().unwrap_or_default(),
    }
}

/// Why a VM Pod could not be created, as the VM shows it.
#[derive(Debug)]
pub struct Refusal {
    pub reason: &'static str,
    pub message: String,
}

/// Creates the VM Pod. A Pod of that name that is already there is this one (the name
/// is the VM's uid and node). Ok(Err) is the API server's refusal of this VM (quota,
/// LimitRange, admission), which the VM shows; Err is any other failure.
pub async fn create(client: &kube::Client, pod: &Pod) -> Result<Result<(), Refusal>, kube::Error> {
    let api: Api<Pod> = Api::namespaced(client.clone(), &pod.namespace().unwrap_or_default());
    match api.create(&PostParams::default(), pod).await {
        Ok(_) => Ok(Ok(())),
        Err(kube::Error::Api(s)) if s.code == 409 && s.reason == "AlreadyExists" => Ok(Ok(())),
        Err(kube::Error::Api(s)) if s.code == 403 && s.message.contains("exceeded quota") => {
            Ok(Err(Refusal {
                reason: "QuotaExceeded",
                message: s.message,
            }))
        }
        // Admission (LimitRange, policies) and validation refuse this VM's Pod, not the
        // controller: the VM says so.
        Err(kube::Error::Api(s)) if s.code == 403 || s.code == 422 || s.code == 400 => {
            Ok(Err(Refusal {
                reason: "PodRefused",
                message: s.message,
            }))
        }
        Err(e) => Err(e),
    }
}

/// Removes the controller's finalizer from one VM Pod (that instance: its uid is tested),
/// which lets a deleted Pod go. Gone is done.
pub async fn release(client: &kube::Client, ns: &str, name: &str, uid: &str) -> kube::Result<()> {
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    let Some(pod) = api.get_opt(name).await? else {
        return Ok(());
    };
    if pod.uid().as_deref() != Some(uid) || !holds_finalizer(&pod) {
        return Ok(());
    }
    let finalizers: Vec<&String> = pod
        .metadata
        .finalizers
        .iter()
        .flatten()
        .filter(|f| *f != POD_FINALIZER)
        .collect();
    let patch = serde_json::json!([
        {"op": "test", "path": "/metadata/uid", "value": uid},
        {"op": "test", "path": "/metadata/resourceVersion", "value": pod.resource_version()},
        {"op": "replace", "path": "/metadata/finalizers", "value": finalizers},
    ]);
    let patch: json_patch::Patch =
        serde_json::from_value(patch).map_err(kube::Error::SerdeError)?;
    match api
        .patch(
            name,
            &crate::patch::by(super::FIELD_MANAGER),
            &kube::api::Patch::Json::<()>(patch),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

/// Deletes one VM Pod, only that instance of it (its uid as precondition), releasing it
/// first. Gone is done.
pub async fn delete(client: &kube::Client, ns: &str, name: &str, uid: &str) -> kube::Result<()> {
    release(client, ns, name, uid).await?;
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    let dp = DeleteParams {
        preconditions: Some(Preconditions {
            uid: Some(uid.to_string()),
            resource_version: None,
        }),
        ..Default::default()
    };
    match api.delete(name, &dp).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(()),
        Err(e) => Err(e),
    }
}

/// The controller's Pods: every Pod (non-VM Pods take node capacity from VMs), slimmed to
/// what placement reads, and an index of VM Pods by their VM's uid.
#[derive(Clone)]
pub struct Pods {
    pub store: Store<Pod>,
    index: Arc<std::sync::Mutex<Index>>,
}

#[derive(Default)]
struct Index {
    by_vm: HashMap<String, BTreeSet<(String, String)>>,
    /// Filled during a relist, swapped in when it is done.
    next: Option<HashMap<String, BTreeSet<(String, String)>>>,
}

impl Pods {
    pub fn new(store: Store<Pod>) -> Self {
        Pods {
            store,
            index: Default::default(),
        }
    }

    /// The Pods that stand for the VM of uid `uid`.
    pub fn of_vm(&self, uid: &str) -> Vec<Arc<Pod>> {
        let keys: Vec<(String, String)> = self
            .index
            .lock()
            .expect("not poisoned")
            .by_vm
            .get(uid)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default();
        keys.into_iter()
            .filter_map(|(ns, name)| self.store.get(&ObjectRef::new(&name).within(&ns)))
            .collect()
    }

    /// Keeps the index in step with the Pod watch.
    pub fn observe(&self, event: &watcher::Event<Pod>) {
        let key = |p: &Pod| -> Option<(String, (String, String))> {
            let uid = p.labels().get(VM_UID_LABEL)?.clone();
            Some((uid, (p.namespace().unwrap_or_default(), p.name_any())))
        };
        let mut ix = self.index.lock().expect("not poisoned");
        match event {
            watcher::Event::Apply(p) => {
                if let Some((uid, k)) = key(p) {
                    ix.by_vm.entry(uid).or_default().insert(k);
                }
            }
            watcher::Event::Delete(p) => {
                if let Some((uid, k)) = key(p)
                    && let Some(s) = ix.by_vm.get_mut(&uid)
                {
                    s.remove(&k);
                    if s.is_empty() {
                        ix.by_vm.remove(&uid);
                    }
                }
            }
            watcher::Event::Init => ix.next = Some(HashMap::new()),
            watcher::Event::InitApply(p) => {
                if let (Some((uid, k)), Some(next)) = (key(p), ix.next.as_mut()) {
                    next.entry(uid).or_default().insert(k);
                }
            }
            watcher::Event::InitDone => {
                if let Some(next) = ix.next.take() {
                    ix.by_vm = next;
                }
            }
        }
    }
}

/// Pure: the deleted VM Pods still held by the controller's finalizer whose VM the cache
/// no longer has (by name and uid), as (namespace, pod, pod uid, VM name, VM uid). A
/// fresh read of the VM decides before any is released.
pub fn orphan_candidates(
    pods: &[Arc<Pod>],
    vm_cached: impl Fn(&str, &str, &str) -> bool,
) -> Vec<(String, String, String, String, String)> {
    pods.iter()
        .filter(|p| p.metadata.deletion_timestamp.is_some() && holds_finalizer(p))
        .filter_map(|p| {
            let vm_uid = is_vm_pod(p)?.to_string();
            let vm = p.metadata.labels.as_ref()?.get(VM_LABEL)?.clone();
            let ns = p.namespace().unwrap_or_default();
            (!vm_cached(&ns, &vm, &vm_uid))
                .then(|| (ns, p.name_any(), p.uid().unwrap_or_default(), vm, vm_uid))
        })
        .collect()
}

/// Releases deleted VM Pods whose VM is gone (a fresh read says so), or is being deleted
/// and no longer holds its domain (its agent is done): nothing else would, since a VM
/// that is gone is never reconciled. Runs every few seconds on the leader; cheap, as
/// only deleted Pods are looked at.
pub async fn release_orphans(ctx: std::sync::Arc<super::Context>) {
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
        let vms = ctx.caches.vms.clone();
        let cached = |ns: &str, name: &str, uid: &str| {
            vms.get(&ObjectRef::new(name).within(ns)).is_some_and(|vm| {
                vm.uid().as_deref() == Some(uid) && vm.metadata.deletion_timestamp.is_none()
            })
        };
        for (ns, pod, pod_uid, vm, vm_uid) in orphan_candidates(&ctx.pods.store.state(), cached) {
            let api: Api<VirtualMachine> = Api::namespaced(ctx.client.clone(), &ns);
            let gone = match api.get_opt(&vm).await {
                Ok(None) => true,
                Ok(Some(v)) => {
                    v.uid().as_deref() != Some(vm_uid.as_str())
                        || (v.metadata.deletion_timestamp.is_some()
                            && !v
                                .finalizers()
                                .iter()
                                .any(|f| f == crate::api::DOMAIN_FINALIZER))
                }
                Err(e) => {
                    tracing::debug!(error = %e, %vm, "VM not read; its Pod waits");
                    false
                }
            };
            if gone && let Err(e) = release(&ctx.client, &ns, &pod, &pod_uid).await {
                tracing::warn!(error = %e, %pod, "VM Pod not released");
            }
        }
    }
}

/// Keeps of a Pod only what the controller reads (its identity, node, requests and
/// phase), so that a cluster's Pods cost the controller little memory.
pub fn slim(pod: &mut Pod) {
    let meta = std::mem::take(&mut pod.metadata);
    pod.metadata = ObjectMeta {
        name: meta.name,
        namespace: meta.namespace,
        uid: meta.uid,
        resource_version: meta.resource_version,
        deletion_timestamp: meta.deletion_timestamp,
        creation_timestamp: meta.creation_timestamp,
        finalizers: meta.finalizers,
        owner_references: meta.owner_references.map(|mut o| {
            o.retain(|r| r.controller == Some(true));
            o
        }),
        labels: meta.labels.map(|mut l| {
            l.retain(|k, _| k == VM_LABEL || k == VM_UID_LABEL);
            l
        }),
        ..Default::default()
    };
    if let Some(spec) = pod.spec.take() {
        let keep = |c: Container| Container {
            name: c.name,
            resources: c.resources.map(|r| ResourceRequirements {
                requests: r.requests,
                ..Default::default()
            }),
            ..Default::default()
        };
        pod.spec = Some(PodSpec {
            node_name: spec.node_name,
            containers: spec.containers.into_iter().map(keep).collect(),
            init_containers: spec
                .init_containers
                .map(|cs| cs.into_iter().map(keep).collect()),
            overhead: spec.overhead,
            resources: spec.resources.map(|r| ResourceRequirements {
                requests: r.requests,
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    if let Some(st) = pod.status.take() {
        pod.status = Some(PodStatus {
            phase: st.phase,
            reason: st.reason,
            message: st.message,
            ..Default::default()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_vm_pod_requests_what_the_scheduler_charges() {
        let oh = Overhead {
            fixed: 100 << 20,
            per_vcpu: 8 << 20,
            per_gib: 8 << 20,
        };
        // (vcpus, guest, ratios) -> (millicores, bytes)
        let table = [
            (1, 1 << 30, (4.0, 1.0), (250, (1 << 30) + (116 << 20))),
            (2, 2 << 30, (4.0, 1.0), (500, (2 << 30) + (132 << 20))),
            (3, 1 << 30, (1.0, 1.0), (3000, (1 << 30) + (132 << 20))),
            (1, 1 << 30, (3.0, 2.0), (334, ((1 << 30) + (116 << 20)) / 2)),
            (0, 0, (4.0, 1.0), (250, (108 << 20))),
        ];
        for (vcpus, guest, ratios, (cpu, mem)) in table {
            let s = sizing(vcpus, guest, &oh, ratios);
            assert_eq!(
                (s.cpu_millis, s.memory),
                (cpu, mem),
                "{vcpus} {guest} {ratios:?}"
            );
        }
        // Other Pods' CPU in vmlet's units (vCPUs they keep from VMs), rounded up.
        for (millis, r, want) in [
            (250, 4.0, 1),
            (1000, 4.0, 4),
            (100, 4.0, 1),
            (0, 4.0, 0),
            (1500, 1.0, 2),
        ] {
            assert_eq!(vcpu_equivalent(millis, r), want, "{millis} {r}");
        }
    }

    #[test]
    fn pods_count_as_the_kubelet_counts_them() {
        let pod = |v: serde_json::Value| -> Pod { serde_json::from_value(v).unwrap() };
        let c = |cpu: &str, mem: &str| json!({"name": "c", "resources": {"requests": {"cpu": cpu, "memory": mem}}});
        // containers, init containers, overhead, pod-level -> (m, bytes)
        let table = [
            (
                json!({"containers": [c("100m", "64Mi"), c("0.5", "1Gi")]}),
                (600, (1 << 30) + (64 << 20)),
            ),
            (
                json!({"containers": [c("100m", "64Mi")], "initContainers": [c("2", "16Mi")]}),
                (2000, 64 << 20),
            ),
            (
                json!({"containers": [c("1", "1Gi")], "overhead": {"cpu": "250m", "memory": "120Mi"}}),
                (1250, (1 << 30) + (120 << 20)),
            ),
            (
                json!({"containers": [c("1", "1Gi")], "resources": {"requests": {"cpu": "3", "memory": "2Gi"}}}),
                (3000, 2 << 30),
            ),
            (json!({"containers": [{"name": "none"}]}), (0, 0)),
        ];
        for (spec, (cpu, mem)) in table {
            let p = pod(json!({"metadata": {"name": "p"}, "spec": spec}));
            let s = pod_requests(&p);
            assert_eq!((s.cpu_millis, s.memory), (cpu, mem), "{spec}");
        }
        assert_eq!(parse_cpu_millis("1.5"), Some(1500));
        assert_eq!(parse_cpu_millis("x"), None);
    }

    fn vm() -> VirtualMachine {
        let mut vm: VirtualMachine = serde_json::from_value(json!({
            "apiVersion": "vmlet.dev/v1alpha1", "kind": "VirtualMachine",
            "metadata": {"name": "web", "namespace": "t", "uid": "u-1"},
            "spec": {"memory": "1Gi", "nodeSelector": {"zone": "a"},
                     "tolerations": [{"key": "gpu", "operator": "Exists"}],
                     "priorityClassName": "high",
                     "podMetadata": {"labels": {"app": "web", "vmlet.dev/vm": "forged"}, "annotations": {"a": "b"}}}
        }))
        .unwrap();
        vm.metadata.uid = Some("u-1".into());
        vm
    }

    #[test]
    fn the_vm_pod_is_bound_owned_labelled_and_holds_no_privilege() {
        let s = Sizing {
            cpu_millis: 500,
            memory: 1 << 30,
        };
        let p = desired(&vm(), "n1", s, "vmlet:dev");
        assert_eq!(
            p.metadata.name.as_deref(),
            Some(pod_name("web", "u-1", "n1").as_str())
        );
        let labels = p.metadata.labels.clone().unwrap();
        assert_eq!(
            labels[VM_LABEL], "web",
            "the user cannot forge vmlet's labels"
        );
        assert_eq!(labels[VM_UID_LABEL], "u-1");
        assert_eq!(labels["app"], "web");
        let owner = &p.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str(), owner.controller),
            ("VirtualMachine", "u-1", Some(true))
        );
        let spec = p.spec.unwrap();
        assert_eq!(spec.node_name.as_deref(), Some("n1"));
        assert_eq!(spec.scheduler_name.as_deref(), Some("vmlet"));
        assert_eq!(spec.priority_class_name.as_deref(), Some("high"));
        assert_eq!(spec.node_selector.unwrap()["zone"], "a");
        let keys: Vec<_> = spec
            .tolerations
            .unwrap()
            .into_iter()
            .filter_map(|t| t.key)
            .collect();
        assert_eq!(
            keys,
            [
                "gpu",
                "node.kubernetes.io/not-ready",
                "node.kubernetes.io/unreachable"
            ]
        );
        assert_eq!(spec.automount_service_account_token, Some(false));
        assert!(
            holds_finalizer(&desired(&vm(), "n1", s, "i")),
            "its deletion waits for the VM"
        );
        let c = &spec.containers[0];
        let req = c.resources.as_ref().unwrap().requests.as_ref().unwrap();
        assert_eq!(
            (req["cpu"].0.as_str(), req["memory"].0.as_str()),
            ("500m", "1073741824")
        );
        let lim = c.resources.as_ref().unwrap().limits.as_ref().unwrap();
        assert_eq!(lim.len(), 1, "memory only: {lim:?}");
        assert_eq!(lim["memory"], req["memory"]);
        assert_eq!(
            c.command.as_deref(),
            Some(&[PLACEHOLDER_COMMAND.to_string()][..])
        );
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(
            sc.capabilities.as_ref().unwrap().drop.as_deref(),
            Some(&["ALL".to_string()][..])
        );
    }

    fn pod(name: &str, node: &str, phase: Option<&str>, going: bool) -> Pod {
        pod_of("vm-uid", name, node, phase, "OutOfmemory", going)
    }

    fn pod_of(
        owner: &str,
        name: &str,
        node: &str,
        phase: Option<&str>,
        reason: &str,
        going: bool,
    ) -> Pod {
        let mut p: Pod = serde_json::from_value(json!({
            "metadata": {"name": name, "uid": format!("uid-{name}"), "labels": {VM_UID_LABEL: "vm-uid"},
                         "ownerReferences": [{"apiVersion": "vmlet.dev/v1alpha1", "kind": "VirtualMachine",
                                              "name": "web", "uid": owner, "controller": true}]},
            "spec": {"nodeName": node, "containers": []},
            "status": {"phase": phase, "reason": reason, "message": "Node didn't have enough resource: memory"}
        }))
        .unwrap();
        if going {
            p.metadata.deletion_timestamp =
                Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    k8s_openapi::jiff::Timestamp::from_second(1).unwrap(),
                ));
        }
        p
    }

    #[test]
    fn one_live_pod_on_the_vms_node_and_none_elsewhere() {
        let del = |n: &str| Step::Delete {
            name: n.into(),
            uid: format!("uid-{n}"),
        };
        let a_running = pod("a", "n1", Some("Running"), false);
        let a_pending = pod("a", "n1", Some("Pending"), false);
        let a_going = pod("a", "n1", Some("Running"), true);
        let a_failed = pod("a", "n1", Some("Failed"), false);
        let a_done = pod("a", "n1", Some("Succeeded"), false);
        let b_old = pod("b", "n0", Some("Running"), false);
        let b_going = pod("b", "n0", Some("Running"), true);
        // Ended by a node-pressure eviction: not a refusal, a new Pod replaces it.
        let a_evicted = pod_of("vm-uid", "a", "n1", Some("Failed"), "Evicted", false);
        // Labelled as the VM's by someone else: neither the VM's Pod nor to delete.
        let forged = pod_of("someone-else", "f", "n1", Some("Running"), "", false);
        let held = |mut p: Pod| {
            p.metadata.finalizers = Some(vec![POD_FINALIZER.into()]);
            p
        };
        // Deleted (by hand, or evicted by a drain) while the VM is bound there: the VM
        // must leave first; once it has, the Pod is released.
        let a_evicted_held = held(pod("a", "n1", Some("Running"), true));
        let b_left_held = held(pod("b", "n0", Some("Running"), true));
        let table: Vec<(Option<&str>, Vec<&Pod>, Vec<Step>)> = vec![
            (Some("n1"), vec![], vec![Step::Create]),
            (Some("n1"), vec![&a_running], vec![]),
            (Some("n1"), vec![&a_pending], vec![]),
            // Its name is taken until it is gone: no second create meanwhile.
            (Some("n1"), vec![&a_going], vec![]),
            (Some("n1"), vec![&a_done], vec![del("a")]),
            (Some("n1"), vec![&a_evicted], vec![del("a")]),
            (Some("n1"), vec![&forged], vec![Step::Create]),
            (
                Some("n1"),
                vec![&a_evicted_held],
                vec![Step::Evict { name: "a".into() }],
            ),
            (
                Some("n1"),
                vec![&b_left_held],
                vec![
                    Step::Release {
                        name: "b".into(),
                        uid: "uid-b".into(),
                    },
                    Step::Create,
                ],
            ),
            (
                None,
                vec![&a_evicted_held],
                vec![Step::Release {
                    name: "a".into(),
                    uid: "uid-a".into(),
                }],
            ),
            (None, vec![&forged], vec![]),
            (
                Some("n1"),
                vec![&a_failed],
                vec![Step::Refused {
                    name: "a".into(),
                    uid: "uid-a".into(),
                    reason: "OutOfmemory".into(),
                    message: "Node didn't have enough resource: memory".into(),
                }],
            ),
            // Moved: the old node's Pod goes, the new node's comes.
            (Some("n1"), vec![&b_old], vec![del("b"), Step::Create]),
            (Some("n1"), vec![&b_going, &a_running], vec![]),
            // Unbound: nothing stays.
            (None, vec![&b_old, &a_running], vec![del("b"), del("a")]),
            (None, vec![], vec![]),
        ];
        for (node, pods, want) in table {
            assert_eq!(plan("vm-uid", node, &pods), want, "{node:?}");
        }
    }

    #[test]
    fn orphans_are_deleted_held_pods_whose_vm_the_cache_lacks() {
        let mut gone = pod("a", "n1", Some("Running"), true);
        gone.metadata.finalizers = Some(vec![POD_FINALIZER.into()]);
        gone.metadata
            .labels
            .as_mut()
            .unwrap()
            .insert(VM_LABEL.into(), "web".into());
        let mut live = gone.clone();
        live.metadata.deletion_timestamp = None;
        let mut released = gone.clone();
        released.metadata.finalizers = None;
        let pods: Vec<Arc<Pod>> = [gone, live, released].into_iter().map(Arc::new).collect();
        let none = orphan_candidates(&pods, |_, _, _| false);
        assert_eq!(none.len(), 1, "only the deleted Pod still held");
        assert_eq!((none[0].3.as_str(), none[0].4.as_str()), ("web", "vm-uid"));
        assert!(
            orphan_candidates(&pods, |_, name, uid| name == "web" && uid == "vm-uid").is_empty()
        );
    }

    #[test]
    fn slim_pods_keep_what_placement_reads() {
        let mut p: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "n", "uid": "u", "labels": {"vmlet.dev/vm-uid": "x", "app": "a"},
                         "annotations": {"big": "x"}},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "i", "env": [{"name": "A", "value": "1"}],
                     "resources": {"requests": {"cpu": "1"}, "limits": {"cpu": "2"}}}]},
            "status": {"phase": "Running", "podIP": "10.0.0.1"}
        }))
        .unwrap();
        let before = pod_requests(&p);
        slim(&mut p);
        assert_eq!(pod_requests(&p), before);
        assert_eq!(holds_node(&p), Some("n1"));
        assert!(p.metadata.annotations.is_none());
        assert_eq!(p.labels().len(), 1);
        assert!(p.metadata.owner_references.is_none(), "none was there");
        assert!(p.spec.as_ref().unwrap().containers[0].image.is_none());
        assert!(!holds_finalizer(&p));
        assert!(p.status.as_ref().unwrap().pod_ip.is_none());
    }
}
