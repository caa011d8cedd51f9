//! Placement: filter the hypervisors a VM may run on, score the rest by strategy, pick
//! the best with a deterministic tie-break. Pure; docs/scheduling.md has the maths.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{Taint, Toleration};

use super::selector;
use crate::api::overhead::Overhead;
use crate::api::vm::AntiAffinityTerm;

/// How the scheduler scores hypervisors that fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Strategy {
    /// Least allocated first: spreads load.
    Spread,
    /// Most allocated first: fills nodes, frees whole ones.
    Pack,
    /// Keeps each node's cpu and memory utilisation close to each other.
    Balanced,
}

/// Weights of cpu and memory in the spread and pack scores.
#[derive(Debug, Clone, Copy)]
pub struct Weights {
    pub cpu: f64,
    pub memory: f64,
}

impl Default for Weights {
    fn default() -> Self {
        Weights {
            cpu: 1.0,
            memory: 1.0,
        }
    }
}

/// One hypervisor as the scheduler sees it.
#[derive(Debug, Clone, Default)]
pub struct Candidate {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub taints: Vec<Taint>,
    /// Why the node takes no VMs at all (not labelled, cordoned, not Ready, stale lease).
    pub ineligible: Option<Reason>,
    pub allocatable_cpu: i64,
    pub allocatable_memory: u64,
    pub allocated_cpu: i64,
    pub allocated_memory: u64,
    /// Whether its libvirt offers UEFI firmware (Hypervisor status.uefi).
    pub uefi: bool,
    /// The storage pools its agent declares (Hypervisor status.storagePools).
    pub pools: Vec<String>,
    /// What a VM costs it beyond guest memory (Hypervisor status.vmOverhead);
    /// `allocated_memory` already includes it for the VMs there.
    pub overhead: Overhead,
}

impl Candidate {
    /// The host memory `req` takes here: its guest memory and its overhead.
    pub fn memory_for(&self, req: &Request) -> u64 {
        req.memory
            .saturating_add(self.overhead.of(1, req.cpu, req.memory))
    }
}

/// A VM already placed, for anti-affinity.
#[derive(Debug, Clone)]
pub struct Placed {
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub node: String,
    pub anti_affinity: Vec<AntiAffinityTerm>,
}

/// What the VM asks for.
#[derive(Debug, Clone, Default)]
pub struct Request {
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub cpu: i64,
    pub memory: u64,
    pub node_selector: BTreeMap<String, String>,
    pub tolerations: Vec<Toleration>,
    pub anti_affinity: Vec<AntiAffinityTerm>,
    /// It boots UEFI firmware: only nodes that offer it can run it.
    pub uefi: bool,
    /// The node its local volumes live on: it runs there or nowhere.
    pub node: Option<String>,
    /// The storage pools its volumes are on: the node must have each.
    pub pools: Vec<String>,
}

/// Why a hypervisor was filtered out; the order is the order of the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    NotHypervisor,
    Cordoned,
    NotReady,
    LeaseStale,
    NodeSelector,
    NoUefi,
    VolumeElsewhere,
    NoStoragePool,
    Taint,
    AntiAffinity,
    InsufficientCpu,
    InsufficientMemory,
}

impl Reason {
    pub fn text(self) -> &'static str {
        match self {
            Reason::NotHypervisor => "not a hypervisor",
            Reason::Cordoned => "cordoned",
            Reason::NotReady => "hypervisor not ready",
            Reason::LeaseStale => "heartbeat lease stale",
            Reason::NodeSelector => "node selector mismatch",
            Reason::NoUefi => "no UEFI firmware",
            Reason::VolumeElsewhere => "its local volume is on another node",
            Reason::NoStoragePool => "storage pool missing",
            Reason::Taint => "untolerated taint",
            Reason::AntiAffinity => "anti-affinity conflict",
            Reason::InsufficientCpu => "insufficient cpu",
            Reason::InsufficientMemory => "insufficient memory",
        }
    }
}

/// No hypervisor fits: how many were refused for each reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unschedulable {
    pub total: usize,
    pub reasons: BTreeMap<Reason, usize>,
}

impl std::fmt::Display for Unschedulable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "0/{} hypervisors available", self.total)?;
        let parts: Vec<String> = self
            .reasons
            .iter()
            .map(|(r, n)| format!("{n} {}", r.text()))
            .collect();
        if !parts.is_empty() {
            write!(f, ": {}", parts.join(", "))?;
        }
        Ok(())
    }
}

/// Taints the node lifecycle controller sets when the *kubelet* stops reporting. A
/// hypervisor's liveness is its agent's Lease (checked separately), and VMs are not Pods:
/// these taints say nothing about whether the node can run domains.
const KUBELET_HEALTH_TAINTS: [&str; 2] = [
    "node.kubernetes.io/not-ready",
    "node.kubernetes.io/unreachable",
];

fn tolerates(tolerations: &[Toleration], taint: &Taint) -> bool {
    tolerations.iter().any(|t| {
        let key_ok = match t.key.as_deref() {
            None | Some("") => t.operator.as_deref() == Some("Exists"),
            Some(k) => k == taint.key,
        };
        let value_ok = match t.operator.as_deref() {
            Some("Exists") => true,
            _ => t.value.as_deref().unwrap_or("") == taint.value.as_deref().unwrap_or(""),
        };
        let effect_ok = t
            .effect
            .as_deref()
            .is_none_or(|e| e.is_empty() || e == taint.effect);
        key_ok && value_ok && effect_ok
    })
}

/// The topology domain a node is in for `key`; every node is its own hostname domain.
fn domain<'a>(c: &'a Candidate, key: &str) -> Option<&'a str> {
    match c.labels.get(key) {
        Some(v) => Some(v),
        None if key == "kubernetes.io/hostname" => Some(&c.name),
        None => None,
    }
}

/// Domains (per topology key) that a new VM must avoid: where a VM it repels runs, or
/// where a VM runs whose own anti-affinity repels it (required anti-affinity is symmetric).
fn forbidden_domains(
    req: &Request,
    placed: &[Placed],
    candidates: &[Candidate],
) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    // Built on first need: most VMs carry no anti-affinity, and a cycle asks per VM.
    let mut nodes: Option<BTreeMap<&str, &Candidate>> = None;
    for p in placed {
        if (req.anti_affinity.is_empty() && p.anti_affinity.is_empty())
            || p.namespace != req.namespace
        {
            continue;
        }
        let nodes =
            nodes.get_or_insert_with(|| candidates.iter().map(|c| (c.name.as_str(), c)).collect());
        let Some(node) = nodes.get(p.node.as_str()) else {
            continue;
        };
        let terms_ours = req
            .anti_affinity
            .iter()
            .filter(|t| selector::matches(&t.label_selector, &p.labels));
        let terms_theirs = p
            .anti_affinity
            .iter()
            .filter(|t| selector::matches(&t.label_selector, &req.labels));
        for t in terms_ours.chain(terms_theirs) {
            if let Some(d) = domain(node, &t.topology_key) {
                out.insert((t.topology_key.clone(), d.to_string()));
            }
        }
    }
    out
}

/// Filters: the first reason a node cannot take the VM, or None when it fits.
fn filter(req: &Request, c: &Candidate, forbidden: &BTreeSet<(String, String)>) -> Option<Reason> {
    if let Some(r) = c.ineligible {
        return Some(r);
    }
    if req
        .node_selector
        .iter()
        .any(|(k, v)| c.labels.get(k) != Some(v))
    {
        return Some(Reason::NodeSelector);
    }
    if req.uefi && !c.uefi {
        return Some(Reason::NoUefi);
    }
    if req.node.as_ref().is_some_and(|n| *n != c.name) {
        return Some(Reason::VolumeElsewhere);
    }
    if req.pools.iter().any(|p| !c.pools.contains(p)) {
        return Some(Reason::NoStoragePool);
    }
    let hard = |t: &&Taint| {
        (t.effect == "NoSchedule" || t.effect == "NoExecute")
            && !KUBELET_HEALTH_TAINTS.contains(&t.key.as_str())
    };
    if c.taints
        .iter()
        .filter(hard)
        .any(|t| !tolerates(&req.tolerations, t))
    {
        return Some(Reason::Taint);
    }
    let keys: BTreeSet<&str> = forbidden.iter().map(|(k, _)| k.as_str()).collect();
    if keys
        .iter()
        .any(|k| domain(c, k).is_some_and(|d| forbidden.contains(&(k.to_string(), d.to_string()))))
    {
        return Some(Reason::AntiAffinity);
    }
    if c.allocated_cpu + req.cpu > c.allocatable_cpu {
        return Some(Reason::InsufficientCpu);
    }
    if c.allocated_memory.saturating_add(c.memory_for(req)) > c.allocatable_memory {
        return Some(Reason::InsufficientMemory);
    }
    None
}

fn ratio(used: f64, cap: f64) -> f64 {
    if cap <= 0.0 {
        1.0
    } else {
        (used / cap).clamp(0.0, 1.0)
    }
}

/// The score of placing `req` on `c` (higher is better), in [0, 1].
pub fn score(req: &Request, c: &Candidate, strategy: Strategy, w: Weights) -> f64 {
    let u_cpu = ratio((c.allocated_cpu + req.cpu) as f64, c.allocatable_cpu as f64);
    let u_mem = ratio(
        c.allocated_memory.saturating_add(c.memory_for(req)) as f64,
        c.allocatable_memory as f64,
    );
    let wsum = (w.cpu + w.memory).max(f64::EPSILON);
    match strategy {
        Strategy::Spread => (w.cpu * (1.0 - u_cpu) + w.memory * (1.0 - u_mem)) / wsum,
        Strategy::Pack => (w.cpu * u_cpu + w.memory * u_mem) / wsum,
        // Kubernetes' NodeResourcesBalancedAllocation: 1 - standard deviation of the
        // utilisations, which for two resources is |u_cpu - u_mem| / 2.
        Strategy::Balanced => 1.0 - (u_cpu - u_mem).abs() / 2.0,
    }
}

/// The hypervisors `req` fits on, in the order of `candidates`; or why none.
fn feasible<'a>(
    req: &Request,
    candidates: &'a [Candidate],
    placed: &[Placed],
) -> Result<Vec<&'a Candidate>, Unschedulable> {
    let forbidden = forbidden_domains(req, placed, candidates);
    let mut reasons = BTreeMap::new();
    let mut fit = Vec::new();
    for c in candidates {
        match filter(req, c, &forbidden) {
            Some(r) => *reasons.entry(r).or_insert(0) += 1,
            None => fit.push(c),
        }
    }
    if fit.is_empty() {
        return Err(Unschedulable {
            total: candidates.len(),
            reasons,
        });
    }
    Ok(fit)
}

/// Picks the hypervisor for `req`: the highest score; ties go to the smallest name.
pub fn schedule(
    req: &Request,
    candidates: &[Candidate],
    placed: &[Placed],
    strategy: Strategy,
    weights: Weights,
) -> Result<String, Unschedulable> {
    let mut best: Option<(f64, &str)> = None;
    for c in feasible(req, candidates, placed)? {
        let s = score(req, c, strategy, weights);
        let better = match best {
            None => true,
            Some((bs, bn)) => s > bs + 1e-12 || ((s - bs).abs() <= 1e-12 && c.name.as_str() < bn),
        };
        if better {
            best = Some((s, &c.name));
        }
    }
    Ok(best.map(|(_, n)| n.to_string()).unwrap_or_default())
}

/// First fit: the first hypervisor in `opened` that `req` fits on, else the first empty
/// one by name, which then joins `opened` (First-Fit-Decreasing's bins, in the order they
/// were opened).
fn first_fit(
    req: &Request,
    candidates: &[Candidate],
    placed: &[Placed],
    opened: &mut Vec<String>,
) -> Result<String, Unschedulable> {
    let fit: BTreeSet<&str> = feasible(req, candidates, placed)?
        .into_iter()
        .map(|c| c.name.as_str())
        .collect();
    if let Some(n) = opened.iter().find(|n| fit.contains(n.as_str())) {
        return Ok(n.clone());
    }
    // None of `opened` fits and it holds every hypervisor in use: the smallest fitting
    // name is an empty one.
    let first = fit.first().copied().unwrap_or_default().to_string();
    opened.push(first.clone());
    Ok(first)
}

/// Counts `req` as placed on `node`: its cpu, its memory with the node's overhead, and
/// its labels for anti-affinity.
pub fn count(req: &Request, node: &str, candidates: &mut [Candidate], placed: &mut Vec<Placed>) {
    if let Some(c) = candidates.iter_mut().find(|c| c.name == node) {
        c.allocated_memory = c.allocated_memory.saturating_add(c.memory_for(req));
        c.allocated_cpu += req.cpu;
    }
    placed.push(Placed {
        namespace: req.namespace.clone(),
        labels: req.labels.clone(),
        node: node.to_string(),
        anti_affinity: req.anti_affinity.clone(),
    });
}

/// The order a cycle decides in: largest first, by the larger of the VM's shares of the
/// biggest node's cpu and memory; ties keep arrival order (the sort is stable).
pub fn cycle_order(reqs: &[Request], candidates: &[Candidate]) -> Vec<usize> {
    let (max_cpu, max_mem) = candidates.iter().fold((1i64, 1u64), |(c, m), n| {
        (c.max(n.allocatable_cpu), m.max(n.allocatable_memory))
    });
    let (max_cpu, max_mem) = (max_cpu as f64, max_mem as f64);
    let size = |r: &Request| (r.cpu as f64 / max_cpu).max(r.memory as f64 / max_mem);
    let mut order: Vec<usize> = (0..reqs.len()).collect();
    order.sort_by(|&a, &b| size(&reqs[b]).total_cmp(&size(&reqs[a])));
    order
}

/// One scheduling cycle: every VM pending at that moment, decided against one view, each
/// decision counted in `candidates` and `placed` before the next. The decisions come in
/// the order of `reqs`; a cycle of one VM is the online decision.
///
/// Spread and Balanced decide largest first. Pack plans three ways, best fit largest
/// first (the Pack score), First-Fit-Decreasing, and best fit in arrival order, and keeps
/// the plan that places the most VMs on the fewest hypervisors (ties: that order). No
/// one of them wins on every input, so a burst packs no worse than FFD and no worse than
/// the same VMs arriving one by one.
pub fn schedule_cycle(
    reqs: &[Request],
    candidates: &mut [Candidate],
    placed: &mut Vec<Placed>,
    strategy: Strategy,
    weights: Weights,
) -> Vec<Result<String, Unschedulable>> {
    let largest_first = cycle_order(reqs, candidates);
    let plan = |order: &[usize],
                first_fit_rule: bool,
                cands: &mut [Candidate],
                placed: &mut Vec<Placed>| {
        // First fit's bins, in the order they were opened; best fit needs none.
        let mut opened: Vec<String> = if first_fit_rule {
            cands
                .iter()
                .filter(|c| in_use(c))
                .map(|c| c.name.clone())
                .collect()
        } else {
            vec![]
        };
        opened.sort();
        let mut out: Vec<Option<Result<String, Unschedulable>>> = vec![None; reqs.len()];
        for &i in order {
            let req = &reqs[i];
            let decision = if first_fit_rule {
                first_fit(req, cands, placed, &mut opened)
            } else {
                schedule(req, cands, placed, strategy, weights)
            };
            if let Ok(node) = &decision {
                count(req, node, cands, placed);
            }
            out[i] = Some(decision);
        }
        out.into_iter()
            .map(|d| d.expect("every index decided"))
            .collect::<Vec<_>>()
    };
    if strategy != Strategy::Pack || reqs.len() < 2 {
        return plan(&largest_first, false, candidates, placed);
    }
    let arrival: Vec<usize> = (0..reqs.len()).collect();
    let plans = [
        (&largest_first, false),
        (&largest_first, true),
        (&arrival, false),
    ];
    // Each plan works on copies; its pushes onto `placed` are taken off again.
    let base = placed.len();
    // (how good, the snapshot after, its pushes onto `placed`, its decisions)
    type Plan = (Outcome, Vec<Candidate>, Vec<Placed>, Decisions);
    let mut best: Option<Plan> = None;
    for (order, first_fit_rule) in plans {
        let mut cands = candidates.to_vec();
        let decisions = plan(order, first_fit_rule, &mut cands, placed);
        let tail = placed.split_off(base);
        let outcome = Outcome::of(&decisions, &cands);
        if best.as_ref().is_none_or(|b| outcome > b.0) {
            best = Some((outcome, cands, tail, decisions));
        }
    }
    let (_, cands, tail, decisions) = best.expect("three plans");
    candidates.clone_from_slice(&cands);
    placed.extend(tail);
    decisions
}

/// A cycle's answers, in the order of its requests.
type Decisions = Vec<Result<String, Unschedulable>>;

/// How good a cycle's plan is: more VMs placed, then fewer hypervisors in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Outcome {
    placed: usize,
    free: std::cmp::Reverse<usize>,
}

impl Outcome {
    fn of(decisions: &[Result<String, Unschedulable>], candidates: &[Candidate]) -> Self {
        Outcome {
            placed: decisions.iter().filter(|d| d.is_ok()).count(),
            free: std::cmp::Reverse(candidates.iter().filter(|c| in_use(c)).count()),
        }
    }
}

/// Whether a hypervisor already carries VMs.
fn in_use(c: &Candidate) -> bool {
    c.allocated_cpu > 0 || c.allocated_memory > 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

    const GI: u64 = 1 << 30;

    fn node(name: &str, cpu: i64, mem_gi: u64) -> Candidate {
        Candidate {
            name: name.into(),
            allocatable_cpu: cpu,
            allocatable_memory: mem_gi * GI,
            ..Default::default()
        }
    }

    fn req(cpu: i64, mem_gi: u64) -> Request {
        Request {
            namespace: "ns".into(),
            cpu,
            memory: mem_gi * GI,
            ..Default::default()
        }
    }

    #[test]
    fn a_pack_cycle_keeps_the_plan_on_the_fewest_hypervisors() {
        // (vms as (cpu, GiB) on 8-cpu 8-GiB nodes, hypervisors used by best fit largest
        // first / FFD / best fit in arrival order) -> the cycle uses the fewest
        type Case = (&'static [(i64, u64)], [usize; 3]);
        let table: [Case; 3] = [
            (&[(2, 6), (4, 5), (3, 1), (3, 3)], [3, 2, 3]),
            (&[(3, 1), (1, 4), (5, 4), (3, 3), (3, 4)], [3, 3, 2]),
            (&[(2, 1), (2, 1), (6, 1), (6, 1)], [2, 2, 3]),
        ];
        for (vms, plans) in table {
            let reqs: Vec<Request> = vms.iter().map(|&(c, m)| req(c, m)).collect();
            let fresh = || -> Vec<Candidate> {
                (0..vms.len())
                    .map(|i| node(&format!("n{i}"), 8, 8))
                    .collect()
            };
            let used = |c: &[Candidate]| c.iter().filter(|c| in_use(c)).count();
            let order = cycle_order(&reqs, &fresh());
            let arrival: Vec<usize> = (0..reqs.len()).collect();
            for ((o, first), want) in [(&order, false), (&order, true), (&arrival, false)]
                .into_iter()
                .zip(plans)
            {
                let (mut c, mut placed, mut opened) = (fresh(), vec![], vec![]);
                for &i in o.iter() {
                    let n = if first {
                        first_fit(&reqs[i], &c, &placed, &mut opened)
                    } else {
                        schedule(&reqs[i], &c, &placed, Strategy::Pack, Weights::default())
                    };
                    count(&reqs[i], &n.unwrap(), &mut c, &mut placed);
                }
                assert_eq!(used(&c), want, "{vms:?}, first fit {first}");
            }
            let mut c = fresh();
            let mut placed = vec![];
            let got = schedule_cycle(
                &reqs,
                &mut c,
                &mut placed,
                Strategy::Pack,
                Weights::default(),
            );
            assert!(got.iter().all(|d| d.is_ok()));
            assert_eq!(used(&c), *plans.iter().min().unwrap(), "{vms:?}");
            assert_eq!(placed.len(), vms.len(), "each VM counted once: {vms:?}");
        }
    }

    #[test]
    fn a_cycle_decides_largest_first_and_answers_in_arrival_order() {
        // (vms as (cpu, GiB) in arrival order) -> where each lands, packing two 8-cpu nodes
        let mut nodes = vec![node("a", 8, 64), node("b", 8, 64)];
        let reqs = [req(2, 1), req(2, 1), req(6, 1), req(6, 1)];
        let got = schedule_cycle(
            &reqs,
            &mut nodes,
            &mut vec![],
            Strategy::Pack,
            Weights::default(),
        );
        let got: Vec<&str> = got.iter().map(|d| d.as_deref().unwrap()).collect();
        // Online, the two small ones would share a node and leave no room for either
        // 6-cpu VM on it; largest first, each big one gets a node and a small one beside.
        assert_eq!(got, ["a", "b", "a", "b"]);
        assert_eq!((nodes[0].allocated_cpu, nodes[1].allocated_cpu), (8, 8));
        let mut online = vec![node("a", 8, 64), node("b", 8, 64)];
        let mut unplaced = 0;
        for r in &reqs {
            match schedule(r, &online, &[], Strategy::Pack, Weights::default()) {
                Ok(n) => {
                    online
                        .iter_mut()
                        .find(|c| c.name == n)
                        .unwrap()
                        .allocated_cpu += r.cpu
                }
                Err(_) => unplaced += 1,
            }
        }
        assert_eq!(unplaced, 1, "online packing strands one big VM");
    }

    #[test]
    fn a_cycle_counts_overhead_and_says_why_the_rest_does_not_fit() {
        let mut n = node("a", 64, 0);
        n.allocatable_memory = 1536 << 20;
        n.overhead = Overhead {
            fixed: 256 << 20,
            per_vcpu: 0,
            per_gib: 0,
        };
        let mut nodes = vec![n];
        // Two guests of 768Mi fit 1536Mi, but not with 256Mi of overhead each: the
        // second is refused for memory.
        let r = Request {
            memory: 768 << 20,
            cpu: 1,
            ..req(1, 0)
        };
        let got = schedule_cycle(
            &[r.clone(), r],
            &mut nodes,
            &mut vec![],
            Strategy::Spread,
            Weights::default(),
        );
        assert_eq!(got[0].as_deref(), Ok("a"));
        let why = got[1].as_ref().unwrap_err();
        assert_eq!(why.reasons.get(&Reason::InsufficientMemory), Some(&1));
        assert_eq!(nodes[0].allocated_memory, 1 << 30);
    }

    #[test]
    fn volumes_pin_a_vm_to_their_node_or_to_nodes_with_their_pool() {
        let mut a = node("a", 8, 16);
        let mut b = node("b", 8, 16);
        a.pools = vec!["nfs".into()];
        b.pools = vec!["nfs".into(), "ceph".into()];
        let nodes = [a, b];
        let with = |node: Option<&str>, pools: &[&str]| Request {
            node: node.map(str::to_string),
            pools: pools.iter().map(|p| p.to_string()).collect(),
            ..req(1, 1)
        };
        for (r, want) in [
            (with(Some("a"), &[]), Ok("a")),
            (with(Some("b"), &["nfs"]), Ok("b")),
            (with(None, &["ceph"]), Ok("b")),
            (with(Some("a"), &["ceph"]), Err(())),
            (with(None, &["gluster"]), Err(())),
        ] {
            let got = schedule(&r, &nodes, &[], Strategy::Spread, Weights::default());
            assert_eq!(
                got.as_deref().map_err(|_| ()),
                want,
                "{:?} {:?}",
                r.node,
                r.pools
            );
        }
        let why = schedule(
            &with(Some("c"), &[]),
            &nodes,
            &[],
            Strategy::Spread,
            Weights::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(why.contains("its local volume is on another node"), "{why}");
    }

    #[test]
    fn a_uefi_vm_goes_only_where_libvirt_offers_uefi() {
        let bios_only = node("bios", 8, 16);
        let mut with_ovmf = node("ovmf", 8, 16);
        with_ovmf.uefi = true;
        let uefi = Request {
            uefi: true,
            ..req(1, 1)
        };
        // (nodes, request) -> placement
        let err = schedule(
            &uefi,
            std::slice::from_ref(&bios_only),
            &[],
            Strategy::Spread,
            Weights::default(),
        )
        .unwrap_err();
        assert_eq!(err.reasons.get(&Reason::NoUefi), Some(&1), "{err:?}");
        assert!(err.to_string().contains("no UEFI firmware"), "{err}");
        let both = [bios_only.clone(), with_ovmf.clone()];
        for strategy in [Strategy::Spread, Strategy::Pack] {
            assert_eq!(
                schedule(&uefi, &both, &[], strategy, Weights::default()).unwrap(),
                "ovmf"
            );
        }
        // A BIOS VM may go to either.
        assert!(
            schedule(
                &req(1, 1),
                std::slice::from_ref(&bios_only),
                &[],
                Strategy::Spread,
                Weights::default()
            )
            .is_ok()
        );
    }

    #[test]
    fn spread_prefers_least_allocated_and_pack_the_most() {
        let mut a = node("a", 8, 16);
        a.allocated_cpu = 4;
        a.allocated_memory = 8 * GI;
        let b = node("b", 8, 16);
        let nodes = [a, b];
        let r = req(1, 1);
        assert_eq!(
            schedule(&r, &nodes, &[], Strategy::Spread, Weights::default()).unwrap(),
            "b"
        );
        assert_eq!(
            schedule(&r, &nodes, &[], Strategy::Pack, Weights::default()).unwrap(),
            "a"
        );
    }

    #[test]
    fn balanced_evens_out_cpu_and_memory() {
        // a is cpu-heavy already; a memory-heavy VM balances it best.
        let mut a = node("a", 10, 10);
        a.allocated_cpu = 6;
        let b = node("b", 10, 10);
        let r = req(0, 6);
        assert_eq!(
            schedule(&r, &[a, b], &[], Strategy::Balanced, Weights::default()).unwrap(),
            "a"
        );
    }

    /// The worked example of docs/scheduling.md.
    #[test]
    fn worked_example() {
        let mem = (31 * GI) / 2; // 15.5 GiB
        let n = |name: &str, cpu: i64, used_gi: u64| Candidate {
            name: name.into(),
            allocatable_cpu: 32,
            allocatable_memory: mem,
            allocated_cpu: cpu,
            allocated_memory: used_gi * GI,
            ..Default::default()
        };
        let nodes = [n("a", 24, 4), n("b", 8, 12), n("c", 2, 15)];
        let r = req(4, 2);
        let w = Weights::default();
        assert_eq!(schedule(&r, &nodes, &[], Strategy::Spread, w).unwrap(), "a");
        assert_eq!(schedule(&r, &nodes, &[], Strategy::Pack, w).unwrap(), "b");
        assert_eq!(
            schedule(&r, &nodes, &[], Strategy::Balanced, w).unwrap(),
            "a"
        );
        assert!((score(&r, &nodes[0], Strategy::Spread, w) - 0.369).abs() < 1e-3);
        assert!((score(&r, &nodes[1], Strategy::Pack, w) - 0.639).abs() < 1e-3);
        assert!((score(&r, &nodes[1], Strategy::Balanced, w) - 0.736).abs() < 1e-3);
        let mem_only = Weights {
            cpu: 0.0,
            memory: 1.0,
        };
        assert!((score(&r, &nodes[1], Strategy::Spread, mem_only) - 0.097).abs() < 1e-3);
        let err = schedule(&req(4, 2), &nodes[2..], &[], Strategy::Spread, w).unwrap_err();
        assert_eq!(
            err.to_string(),
            "0/1 hypervisors available: 1 insufficient memory"
        );
    }

    #[test]
    fn ties_go_to_the_smallest_name() {
        let nodes = [node("c", 8, 8), node("a", 8, 8), node("b", 8, 8)];
        assert_eq!(
            schedule(
                &req(1, 1),
                &nodes,
                &[],
                Strategy::Spread,
                Weights::default()
            )
            .unwrap(),
            "a"
        );
    }

    #[test]
    fn unschedulable_message_counts_reasons() {
        let mut small = node("small", 1, 1);
        small.labels.insert("zone".into(), "a".into());
        let mut cordoned = node("cordoned", 64, 64);
        cordoned.ineligible = Some(Reason::Cordoned);
        let other_zone = node("z", 64, 64);
        let mut r = req(2, 4);
        r.node_selector.insert("zone".into(), "a".into());
        let err = schedule(
            &r,
            &[small, cordoned, other_zone],
            &[],
            Strategy::Spread,
            Weights::default(),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "0/3 hypervisors available: 1 cordoned, 1 node selector mismatch, 1 insufficient cpu"
        );
    }

    #[test]
    fn taints_need_tolerations() {
        let mut t = node("t", 8, 8);
        t.taints.push(Taint {
            key: "dedicated".into(),
            value: Some("vms".into()),
            effect: "NoSchedule".into(),
            ..Default::default()
        });
        let mut r = req(1, 1);
        assert!(
            schedule(
                &r,
                std::slice::from_ref(&t),
                &[],
                Strategy::Spread,
                Weights::default()
            )
            .is_err()
        );
        let mut not_ready = t.clone();
        not_ready.taints = vec![Taint {
            key: "node.kubernetes.io/not-ready".into(),
            effect: "NoSchedule".into(),
            ..Default::default()
        }];
        assert_eq!(
            schedule(&r, &[not_ready], &[], Strategy::Spread, Weights::default()).unwrap(),
            "t"
        );
        r.tolerations.push(Toleration {
            key: Some("dedicated".into()),
            operator: Some("Equal".into()),
            value: Some("vms".into()),
            effect: Some("NoSchedule".into()),
            ..Default::default()
        });
        assert_eq!(
            schedule(&r, &[t], &[], Strategy::Spread, Weights::default()).unwrap(),
            "t"
        );
    }

    #[test]
    fn anti_affinity_is_symmetric() {
        let term = AntiAffinityTerm {
            label_selector: LabelSelector {
                match_labels: Some([("app".to_string(), "db".to_string())].into()),
                ..Default::default()
            },
            topology_key: "kubernetes.io/hostname".into(),
        };
        let placed = [Placed {
            namespace: "ns".into(),
            labels: [("app".to_string(), "db".to_string())].into(),
            node: "a".into(),
            anti_affinity: vec![term.clone()],
        }];
        let nodes = [node("a", 8, 8), node("b", 8, 8)];
        // The new VM has no term of its own but carries the label the placed one repels.
        let mut r = req(1, 1);
        r.labels.insert("app".into(), "db".into());
        assert_eq!(
            schedule(&r, &nodes, &placed, Strategy::Pack, Weights::default()).unwrap(),
            "b"
        );
        // Another namespace does not count.
        r.namespace = "other".into();
        assert_eq!(
            schedule(&r, &nodes, &placed, Strategy::Pack, Weights::default()).unwrap(),
            "a"
        );
    }
}
