//! Which hypervisors exist, which may take VMs, and how full each is, from the Node,
//! Hypervisor and Lease caches and the VMs (bound, or assumed bound) in the cache.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::reflector::{ObjectRef, Store};

use super::scheduler::{
    self, Candidate, Placed, Reason, Request, Strategy, Unschedulable, Weights,
};
use crate::api::overhead::Overhead;
use crate::api::quantity::parse_bytes;
use crate::api::{
    HYPERVISOR_LABEL, Hypervisor, VirtualMachine, VirtualMachineClass, VirtualMachineMigration,
    conditions,
};

/// A placement made but not yet visible in the VM cache: counted against its node until
/// the cache shows the binding (or the entry expires), so that a burst of decisions
/// never over-allocates a node.
#[derive(Debug, Clone)]
pub struct Assumed {
    pub node: String,
    pub at: Instant,
}

/// How long a snapshot serves decisions before it is rebuilt from the caches. Decisions
/// made with it are applied to it, so it never over-allocates; what it can miss for this
/// long is capacity freed by deletions and a node cordoned meanwhile.
pub const SNAPSHOT_TTL: Duration = Duration::from_millis(100);

/// The scheduler's working view: the last snapshot with every decision since applied to
/// it, and the placements not yet visible in the VM cache. Rebuilding the snapshot walks
/// every VM, so a burst of decisions shares one instead of paying that walk per VM.
#[derive(Default)]
pub struct View {
    pub assumed: HashMap<String, Assumed>,
    snapshot: Option<Snapshot>,
}

struct Snapshot {
    at: Instant,
    epoch: u64,
    candidates: Vec<Candidate>,
    placed: Vec<Placed>,
}

impl View {
    /// The candidates and placed VMs to decide with. `epoch` counts events that change
    /// eligibility (a hypervisor changed, a heartbeat came back): a new one forces a rebuild.
    pub fn current(
        &mut self,
        caches: &Caches,
        lease_grace: Duration,
        epoch: u64,
    ) -> (&[Candidate], &[Placed]) {
        let stale = self
            .snapshot
            .as_ref()
            .is_none_or(|s| s.epoch != epoch || s.at.elapsed() >= SNAPSHOT_TTL);
        if stale {
            let (candidates, placed) = caches.snapshot(&mut self.assumed, lease_grace);
            self.snapshot = Some(Snapshot {
                at: Instant::now(),
                epoch,
                candidates,
                placed,
            });
        }
        let s = self.snapshot.as_ref().expect("just built");
        (&s.candidates, &s.placed)
    }

    /// One scheduling cycle over `reqs` (uid, request) against the current view (see
    /// [`scheduler::schedule_cycle`], which counts each decision in the snapshot); each VM
    /// placed is assumed on its node until the cache shows its binding.
    pub fn decide(
        &mut self,
        caches: &Caches,
        lease_grace: Duration,
        epoch: u64,
        reqs: &[(String, Request)],
        strategy: Strategy,
        weights: Weights,
    ) -> Vec<Result<String, Unschedulable>> {
        self.current(caches, lease_grace, epoch);
        let s = self.snapshot.as_mut().expect("just built");
        let only: Vec<Request> = reqs.iter().map(|(_, r)| r.clone()).collect();
        let decisions =
            scheduler::schedule_cycle(&only, &mut s.candidates, &mut s.placed, strategy, weights);
        for ((uid, _), d) in reqs.iter().zip(&decisions) {
            if let Ok(node) = d {
                let a = Assumed {
                    node: node.clone(),
                    at: Instant::now(),
                };
                self.assumed.insert(uid.clone(), a);
            }
        }
        decisions
    }

    /// Records a decision made outside a cycle (a migration's target), in the
    /// assumptions and in the snapshot.
    pub fn assume(&mut self, key: String, req: &Request, node: &str) {
        if let Some(s) = &mut self.snapshot {
            scheduler::count(req, node, &mut s.candidates, &mut s.placed);
        }
        let a = Assumed {
            node: node.to_string(),
            at: Instant::now(),
        };
        self.assumed.insert(key, a);
    }

    /// Forgets a decision whose binding failed; the snapshot still counts it, so it goes.
    pub fn forget(&mut self, uid: &str) {
        self.assumed.remove(uid);
        self.snapshot = None;
    }
}

/// How long an assumption may stay unconfirmed before it is dropped.
pub const ASSUME_TTL: Duration = Duration::from_secs(60);

/// How long ago a heartbeat Lease was renewed, and the duration it promised; None when it
/// was never renewed.
pub fn silence(lease: &Lease, now: Timestamp) -> Option<(Duration, Duration)> {
    let spec = lease.spec.as_ref()?;
    let renewed = spec.renew_time.as_ref()?.0;
    let duration = lease_duration(spec);
    Some((now.duration_since(renewed).unsigned_abs(), duration))
}

pub struct Caches {
    pub vms: Store<VirtualMachine>,
    pub classes: Store<VirtualMachineClass>,
    pub nodes: Store<Node>,
    pub hypervisors: Store<Hypervisor>,
    pub leases: Store<Lease>,
    pub migrations: Store<VirtualMachineMigration>,
    pub volumes: Store<crate::api::VirtualMachineVolume>,
    pub snapshots: Store<crate::api::VirtualMachineSnapshot>,
    pub images: Store<crate::api::VirtualMachineImage>,
    /// Every Pod (slimmed): what Pods other than VM Pods ask of a hypervisor is not
    /// there for VMs.
    pub pods: Store<k8s_openapi::api::core::v1::Pod>,
}

impl Caches {
    /// Whether volume `name` of `vm`'s namespace is on a storage pool (unknown: no).
    pub fn shared_volume(&self, vm: &VirtualMachine, name: &str) -> bool {
        let ns = vm.metadata.namespace.clone().unwrap_or_default();
        self.volumes
            .get(&ObjectRef::new(name).within(&ns))
            .is_some_and(|v| v.spec.pool().is_some())
    }

    pub fn class_of(
        &self,
        vm: &VirtualMachine,
    ) -> Option<Option<crate::api::VirtualMachineClassSpec>> {
        match &vm.spec.class_ref {
            None => Some(None),
            Some(r) => self
                .classes
                .get(&ObjectRef::new(&r.name))
                .map(|c| Some(c.spec.clone())),
        }
    }

    /// The candidates and the placed VMs, with allocation = bound VMs + assumptions.
    /// Drops assumptions the cache has caught up with, or that expired.
    pub fn snapshot(
        &self,
        assumed: &mut HashMap<String, Assumed>,
        lease_grace: Duration,
    ) -> (Vec<Candidate>, Vec<Placed>) {
        let mut used = Used::new();
        let mut placed = Vec::new();
        self.bound_and_assumed(assumed, &mut used, &mut placed);
        assumed.retain(|_, a| a.at.elapsed() < ASSUME_TTL);
        self.migrating(&mut used, &mut placed);
        let now = Timestamp::now();
        let nodes: BTreeMap<String, std::sync::Arc<Node>> = self
            .nodes
            .state()
            .into_iter()
            .filter_map(|n| Some((n.metadata.name.clone()?, n)))
            .collect();
        let others = self.other_pods();
        let candidates = self
            .hypervisor_names(&nodes)
            .into_iter()
            .map(|name| {
                let used = used.get(&name).copied().unwrap_or_default();
                let pods = others.get(&name).copied().unwrap_or_default();
                let node = nodes.get(&name);
                self.candidate(name, node, used, pods, now, lease_grace)
            })
            .collect();
        (candidates, placed)
    }

    /// What a VM costs `node`'s host beyond its guest (the published overhead formula; an
    /// unreadable one counts as none: the agent refuses to start with one), and the node's
    /// (cpu, memory) overcommit ratios (the defaults before its Hypervisor exists).
    pub fn host_terms(&self, node: &str) -> (Overhead, (f64, f64)) {
        let hv = self.hypervisors.get(&ObjectRef::new(node));
        let overhead = hv
            .as_ref()
            .and_then(|h| h.status.as_ref())
            .and_then(|s| s.vm_overhead.as_ref())
            .and_then(|o| Overhead::try_from(o).ok())
            .unwrap_or_default();
        let ratios = hv.as_ref().map_or_else(
            || crate::api::HypervisorSpec::default().ratios(),
            |h| h.spec.ratios(),
        );
        (overhead, ratios)
    }

    /// What the Pods that do not stand for VMs ask of each node, by node. VMs are counted
    /// from their own objects (bound or assumed), so their Pods are not counted twice.
    fn other_pods(&self) -> HashMap<String, super::vmpod::Sizing> {
        let mut by_node: HashMap<String, super::vmpod::Sizing> = HashMap::new();
        for pod in self.pods.state() {
            let vm_pod = super::vmpod::is_vm_pod(&pod).is_some();
            let Some(node) = super::vmpod::holds_node(&pod).filter(|_| !vm_pod) else {
                continue;
            };
            let r = super::vmpod::pod_requests(&pod);
            let e = by_node.entry(node.to_string()).or_default();
            e.cpu_millis += r.cpu_millis;
            e.memory = e.memory.saturating_add(r.memory);
        }
        by_node
    }

    /// Counts each VM where it is bound, or where its binding is assumed (an assumption
    /// ends once the cache shows the binding).
    fn bound_and_assumed(
        &self,
        assumed: &mut HashMap<String, Assumed>,
        used: &mut Used,
        placed: &mut Vec<Placed>,
    ) {
        for vm in self.vms.state() {
            let uid = vm.metadata.uid.clone().unwrap_or_default();
            let bound = vm.status.as_ref().and_then(|s| s.node_name.clone());
            let node = match (&bound, assumed.get(&uid)) {
                (Some(n), _) => {
                    assumed.remove(&uid);
                    n.clone()
                }
                (None, Some(a)) => a.node.clone(),
                (None, None) => continue,
            };
            self.count(&vm, node, used, placed);
        }
    }

    /// A VM being migrated holds its place on the source and on the target until the
    /// migration has settled (the binding moved, or the migration failed).
    fn migrating(&self, used: &mut Used, placed: &mut Vec<Placed>) {
        for m in self.migrations.state() {
            let Some(target) = m.status.as_ref().and_then(|s| s.target_node.clone()) else {
                continue;
            };
            if !m.unsettled() {
                continue;
            }
            let ns = m.metadata.namespace.clone().unwrap_or_default();
            let Some(vm) = self.vms.get(&ObjectRef::new(&m.spec.vm_name).within(&ns)) else {
                continue;
            };
            if vm.status.as_ref().and_then(|s| s.node_name.as_deref()) == Some(target.as_str()) {
                continue;
            }
            self.count(&vm, target, used, placed);
        }
    }

    fn count(&self, vm: &VirtualMachine, node: String, used: &mut Used, placed: &mut Vec<Placed>) {
        if let Some((cpu, mem)) = self.class_of(vm).and_then(|c| vm.spec.requests(c.as_ref())) {
            let e = used.entry(node.clone()).or_default();
            e.vms += 1;
            e.cpu += cpu;
            e.memory += mem;
        }
        placed.push(Placed {
            namespace: vm.metadata.namespace.clone().unwrap_or_default(),
            labels: vm.metadata.labels.clone().unwrap_or_default(),
            node,
            anti_affinity: vm.spec.anti_affinity.clone(),
        });
    }

    /// Every node with a Hypervisor object or the hypervisor label, sorted.
    fn hypervisor_names(&self, nodes: &BTreeMap<String, std::sync::Arc<Node>>) -> Vec<String> {
        let mut names: Vec<String> = self
            .hypervisors
            .state()
            .iter()
            .filter_map(|h| h.metadata.name.clone())
            .collect();
        for (name, n) in nodes {
            if labelled(Some(n)) && !names.contains(name) {
                names.push(name.clone());
            }
        }
        names.sort();
        names
    }

    /// One node as the scheduler sees it: what it offers, what is used, and whether it
    /// may take VMs at all.
    fn candidate(
        &self,
        name: String,
        node: Option<&std::sync::Arc<Node>>,
        used: NodeUse,
        pods: super::vmpod::Sizing,
        now: Timestamp,
        lease_grace: Duration,
    ) -> Candidate {
        let hv = self.hypervisors.get(&ObjectRef::new(&name));
        let status = hv
            .as_ref()
            .and_then(|h| h.status.clone())
            .unwrap_or_default();
        let lease = self.leases.get(
            &ObjectRef::new(&crate::api::heartbeat_lease_name(&name))
                .within(crate::api::HEARTBEAT_LEASE_NAMESPACE),
        );
        let (overhead, (cpu_ratio, memory_ratio)) = self.host_terms(&name);
        let fresh = lease
            .and_then(|l| silence(&l, now))
            .is_some_and(|(age, duration)| age <= duration + lease_grace);
        let ineligible = if !labelled(node) {
            Some(Reason::NotHypervisor)
        } else if node
            .and_then(|n| n.spec.as_ref())
            .and_then(|s| s.unschedulable)
            .unwrap_or(false)
        {
            Some(Reason::Cordoned)
        } else if !conditions::is_true(&status.conditions, conditions::Type::Ready) {
            Some(Reason::NotReady)
        } else if !fresh {
            Some(Reason::LeaseStale)
        } else {
            None
        };
        Candidate {
            labels: node
                .and_then(|n| n.metadata.labels.clone())
                .unwrap_or_default(),
            taints: node
                .and_then(|n| n.spec.as_ref())
                .and_then(|s| s.taints.clone())
                .unwrap_or_default(),
            ineligible,
            allocatable_cpu: status.allocatable.as_ref().map(|a| a.cpu).unwrap_or(0),
            allocatable_memory: status
                .allocatable
                .as_ref()
                .and_then(|a| parse_bytes(&a.memory).ok())
                .unwrap_or(0),
            allocated_cpu: used.cpu + super::vmpod::vcpu_equivalent(pods.cpu_millis, cpu_ratio),
            allocated_memory: used
                .memory
                .saturating_add(overhead.of(used.vms, used.cpu, used.memory))
                // In allocatable's units (host memory x r_mem), as a VM Pod's request
                // is its footprint / r_mem.
                .saturating_add((pods.memory as f64 * memory_ratio).ceil() as u64),
            overhead,
            uefi: status.uefi.unwrap_or(false),
            pools: status
                .storage_pools
                .iter()
                .map(|p| p.name.clone())
                .collect(),
            name,
        }
    }
}

/// What the VMs on one node ask for between them.
#[derive(Clone, Copy, Default)]
struct NodeUse {
    vms: u64,
    cpu: i64,
    memory: u64,
}

/// Per node.
type Used = HashMap<String, NodeUse>;

/// Whether the Node carries the hypervisor label.
fn labelled(node: Option<&std::sync::Arc<Node>>) -> bool {
    node.and_then(|n| n.metadata.labels.as_ref())
        .and_then(|l| l.get(HYPERVISOR_LABEL))
        .map(String::as_str)
        == Some("true")
}

/// A heartbeat Lease's duration (the agents' default when it names none).
pub fn lease_duration(spec: &k8s_openapi::api::coordination::v1::LeaseSpec) -> Duration {
    spec.lease_duration_seconds.map_or(
        Duration::from_secs(crate::api::DEFAULT_LEASE_DURATION_SECONDS),
        |s| Duration::from_secs(s.max(0) as u64),
    )
}
