//! The rebalancer (opt-in): when the utilisation of the hypervisors is too uneven, a short
//! list of live migrations that evens it out. Pure planning here; the loop that acts on
//! it (or only reports it) is below. docs/scheduling.md derives the rule.
//!
//! Utilisation of node i: u_i = (w_c c_i / C_i + w_m m_i / M_i) / (w_c + w_m). Imbalance:
//! the coefficient of variation CV = std(u) / mean(u). One move takes a VM from the most
//! utilised node h to the least utilised node l where it fits; among the VMs on h, the one
//! whose move lowers the variance most. Moves repeat, on the updated loads, until the
//! budget is spent or no move lowers the CV by at least `min_gain`.

use std::sync::Arc;
use std::time::Duration;

use kube::api::{Api, PostParams};
use serde_json::json;

use super::Context;
use super::scheduler::{self, Candidate, Placed, Request, Weights};
use crate::api::vm::{EvictionStrategy, Phase};
use crate::api::{VirtualMachineMigration, conditions};

/// Whether the rebalancer runs, and whether it acts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    Off,
    /// Compute the moves, log them and export them as a metric; move nothing.
    Plan,
    /// Compute the moves and create a VirtualMachineMigration for each.
    Migrate,
}

/// A VM that may move: where it is, what it asks, and its scheduling constraints.
#[derive(Debug, Clone)]
pub struct Movable {
    pub namespace: String,
    pub name: String,
    pub node: String,
    pub request: Request,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Move {
    pub namespace: String,
    pub name: String,
    pub from: String,
    pub to: String,
}

fn utilisation(c: &Candidate, w: Weights) -> f64 {
    let r = |used: f64, cap: f64| if cap <= 0.0 { 0.0 } else { used / cap };
    (w.cpu * r(c.allocated_cpu as f64, c.allocatable_cpu as f64)
        + w.memory * r(c.allocated_memory as f64, c.allocatable_memory as f64))
        / (w.cpu + w.memory).max(f64::EPSILON)
}

/// Coefficient of variation of the utilisation of the eligible nodes; 0 when fewer than
/// two or all empty.
pub fn imbalance(nodes: &[Candidate], w: Weights) -> f64 {
    let u: Vec<f64> = nodes
        .iter()
        .filter(|c| c.ineligible.is_none())
        .map(|c| utilisation(c, w))
        .collect();
    if u.len() < 2 {
        return 0.0;
    }
    let mean = u.iter().sum::<f64>() / u.len() as f64;
    if mean <= 0.0 {
        return 0.0;
    }
    let var = u.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / u.len() as f64;
    var.sqrt() / mean
}

/// At most `max_moves` moves, each lowering the CV by at least `min_gain`.
pub fn plan(
    nodes: &[Candidate],
    vms: &[Movable],
    placed: &[Placed],
    w: Weights,
    max_moves: usize,
    min_gain: f64,
) -> Vec<Move> {
    let mut nodes: Vec<Candidate> = nodes.to_vec();
    let mut vms: Vec<Movable> = vms.to_vec();
    let mut placed: Vec<Placed> = placed.to_vec();
    let mut moves = Vec::new();
    while moves.len() < max_moves {
        let before = imbalance(&nodes, w);
        let eligible: Vec<usize> = (0..nodes.len())
            .filter(|&i| nodes[i].ineligible.is_none())
            .collect();
        let by_u = |i: &usize| utilisation(&nodes[*i], w);
        let (Some(&h), Some(&l)) = (
            eligible.iter().max_by(|a, b| by_u(a).total_cmp(&by_u(b))),
            eligible.iter().min_by(|a, b| by_u(a).total_cmp(&by_u(b))),
        ) else {
            break;
        };
        if h == l {
            break;
        }
        let mut best: Option<(usize, f64)> = None;
        for (vi, vm) in vms
            .iter()
            .enumerate()
            .filter(|(_, v)| v.node == nodes[h].name)
        {
            // The target must take the VM by every scheduler rule, the VM itself aside.
            let others: Vec<Placed> = placed
                .iter()
                .filter(|p| {
                    !(p.node == vm.node
                        && p.namespace == vm.namespace
                        && p.labels == vm.request.labels)
                })
                .cloned()
                .collect();
            let target = std::slice::from_ref(&nodes[l]);
            if scheduler::schedule(&vm.request, target, &others, scheduler::Strategy::Spread, w)
                .is_err()
            {
                continue;
            }
            let mut trial = nodes.clone();
            shift(&mut trial, h, l, &vm.request);
            let after = imbalance(&trial, w);
            if best.is_none_or(|(_, b)| after < b) {
                best = Some((vi, after));
            }
        }
        let Some((vi, after)) = best else { break };
        if before - after < min_gain {
            break;
        }
        let vm = vms.remove(vi);
        shift(&mut nodes, h, l, &vm.request);
        if let Some(p) = placed.iter_mut().find(|p| {
            p.node == vm.node && p.namespace == vm.namespace && p.labels == vm.request.labels
        }) {
            p.node = nodes[l].name.clone();
        }
        moves.push(Move {
            namespace: vm.namespace,
            name: vm.name,
            from: nodes[h].name.clone(),
            to: nodes[l].name.clone(),
        });
    }
    moves
}

fn shift(nodes: &mut [Candidate], from: usize, to: usize, r: &Request) {
    nodes[from].allocated_cpu -= r.cpu;
    nodes[from].allocated_memory = nodes[from].allocated_memory.saturating_sub(r.memory);
    nodes[to].allocated_cpu += r.cpu;
    nodes[to].allocated_memory += r.memory;
}

/// Settings of the loop.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub mode: Mode,
    pub threshold: f64,
    pub max_moves: usize,
    pub interval: Duration,
}

/// Every `interval`: when no migration is under way and the CV passes the threshold,
/// plan, and (mode Migrate) create the migrations.
pub async fn rebalance_loop(ctx: Arc<Context>, s: Settings) {
    if s.mode == Mode::Off {
        return std::future::pending().await;
    }
    loop {
        tokio::time::sleep(s.interval).await;
        let busy = ctx.caches.migrations.state().iter().any(|m| {
            m.status
                .as_ref()
                .and_then(|st| st.phase)
                .is_none_or(|p| !p.finished())
        });
        if busy {
            continue;
        }
        let (nodes, placed) = {
            let mut view = ctx.view.lock().await;
            let epoch = ctx.epoch.load(std::sync::atomic::Ordering::SeqCst);
            let (c, p) = view.current(&ctx.caches, ctx.heartbeat_grace, epoch);
            (c.to_vec(), p.to_vec())
        };
        let cv = imbalance(&nodes, ctx.weights);
        ctx.metrics.set_imbalance(cv);
        if cv <= s.threshold {
            continue;
        }
        let vms: Vec<Movable> = ctx
            .caches
            .vms
            .state()
            .iter()
            .filter(|vm| {
                let st = vm.status.clone().unwrap_or_default();
                st.phase == Some(Phase::Running)
                    && vm
                        .spec
                        .eviction_strategy
                        .unwrap_or(EvictionStrategy::LiveMigrate)
                        == EvictionStrategy::LiveMigrate
                    && conditions::is_true(&st.conditions, conditions::Type::Ready)
            })
            .filter_map(|vm| {
                let node = vm.status.as_ref()?.node_name.clone()?;
                let class = ctx.caches.class_of(vm)?;
                let r = vm.spec.requests(class.as_ref())?;
                Some(Movable {
                    namespace: vm.metadata.namespace.clone()?,
                    name: vm.metadata.name.clone()?,
                    node,
                    request: super::bind::request(vm, class.as_ref(), r),
                })
            })
            .collect();
        let moves = plan(&nodes, &vms, &placed, ctx.weights, s.max_moves, 0.005);
        ctx.metrics.set_planned_moves(moves.len());
        tracing::info!(cv, threshold = s.threshold, moves = ?moves, "rebalance plan");
        if s.mode != Mode::Migrate {
            continue;
        }
        for m in moves {
            let api: Api<VirtualMachineMigration> =
                Api::namespaced(ctx.client.clone(), &m.namespace);
            let mut obj = VirtualMachineMigration::new(
                "",
                serde_json::from_value(json!({"vmName": m.name, "targetNode": m.to}))
                    .expect("a valid spec"),
            );
            obj.metadata.name = None;
            obj.metadata.generate_name = Some(format!("rebalance-{}-", m.name));
            obj.metadata.labels =
                Some([("vmlet.dev/rebalance".to_string(), "true".to_string())].into());
            if let Err(e) = api.create(&PostParams::default(), &obj).await {
                tracing::warn!(vm = %m.name, error = %e, "rebalance migration not created");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, cpu: i64, mem_gib: u64) -> Candidate {
        Candidate {
            name: name.into(),
            allocatable_cpu: 32,
            allocatable_memory: 64 << 30,
            allocated_cpu: cpu,
            allocated_memory: mem_gib << 30,
            ..Default::default()
        }
    }

    fn vm(name: &str, node: &str, cpu: i64, mem_gib: u64) -> Movable {
        Movable {
            namespace: "ns".into(),
            name: name.into(),
            node: node.into(),
            request: Request {
                namespace: "ns".into(),
                cpu,
                memory: mem_gib << 30,
                ..Default::default()
            },
        }
    }

    const W: Weights = Weights {
        cpu: 1.0,
        memory: 1.0,
    };

    #[test]
    fn moves_lower_the_imbalance_within_the_budget() {
        let nodes = [node("a", 24, 48), node("b", 4, 8), node("c", 8, 16)];
        let vms: Vec<Movable> = (0..6)
            .map(|i| vm(&format!("v{i}"), "a", 4, 8))
            .chain([vm("w", "b", 4, 8)])
            .collect();
        let before = imbalance(&nodes, W);
        let moves = plan(&nodes, &vms, &[], W, 2, 0.0);
        assert_eq!(moves.len(), 2);
        assert!(moves.iter().all(|m| m.from == "a"));
        // The first goes to the emptiest node.
        assert_eq!(moves[0].to, "b");
        let mut after = nodes.to_vec();
        for m in &moves {
            let (f, t) = (
                after.iter().position(|n| n.name == m.from).unwrap(),
                after.iter().position(|n| n.name == m.to).unwrap(),
            );
            shift(&mut after, f, t, &vms[0].request);
        }
        assert!(imbalance(&after, W) < before);
    }

    #[test]
    fn nothing_moves_when_balanced_or_nothing_fits() {
        let even = [node("a", 8, 16), node("b", 8, 16)];
        let vms = vec![vm("v", "a", 4, 8)];
        assert_eq!(imbalance(&even, W), 0.0);
        assert!(plan(&even, &vms, &[], W, 5, 0.001).is_empty());
        // The empty node cannot take the only VM on the full one.
        let full = [node("a", 32, 64), node("b", 0, 0)];
        let big = vec![vm("v", "a", 40, 8)];
        assert!(plan(&full, &big, &[], W, 5, 0.0).is_empty());
    }

    #[test]
    fn a_move_that_overshoots_is_not_taken() {
        // Moving the one big VM would only swap which node is full.
        let nodes = [node("a", 16, 32), node("b", 8, 16)];
        let vms = vec![vm("big", "a", 16, 32)];
        assert!(plan(&nodes, &vms, &[], W, 5, 0.001).is_empty());
    }
}
