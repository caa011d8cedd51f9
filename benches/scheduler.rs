//! Scheduler benchmarks (pure, no cluster): decision latency by cluster size, packing
//! quality against the lower bound and First-Fit-Decreasing, imbalance under spread.
//! Prints markdown; `make bench` collects it into docs/benchmarks.md.

use std::time::{Duration, Instant};

use vmlet::controller::scheduler::{
    Candidate, Request, Strategy, Weights, schedule, schedule_cycle,
};

const GI: u64 = 1 << 30;

/// A small deterministic generator (xorshift), so every run sees the same instances.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

fn node(i: usize, cpu: i64, mem: u64) -> Candidate {
    Candidate {
        name: format!("node-{i:05}"),
        allocatable_cpu: cpu,
        allocatable_memory: mem,
        ..Default::default()
    }
}

fn req(cpu: i64, mem: u64) -> Request {
    Request {
        namespace: "bench".into(),
        cpu,
        memory: mem,
        ..Default::default()
    }
}

fn decision_latency() {
    println!("### Decision latency\n");
    println!(
        "One `schedule()` call (filter + score over every hypervisor), median of 200 calls, nodes 40% full at random.\n"
    );
    println!("| hypervisors | median | p99 |\n|---|---|---|");
    let mut rng = Rng(7);
    for n in [100usize, 1_000, 10_000] {
        let nodes: Vec<Candidate> = (0..n)
            .map(|i| {
                let mut c = node(i, 128, 512 * GI);
                c.allocated_cpu = rng.range(0, 100) as i64;
                c.allocated_memory = rng.range(0, 400) * GI;
                c
            })
            .collect();
        let mut samples: Vec<f64> = (0..200)
            .map(|_| {
                let r = req(rng.range(1, 8) as i64, rng.range(1, 16) * GI);
                let t = Instant::now();
                let _ = std::hint::black_box(schedule(
                    &r,
                    &nodes,
                    &[],
                    Strategy::Spread,
                    Weights::default(),
                ));
                t.elapsed().as_secs_f64() * 1e6
            })
            .collect();
        samples.sort_by(f64::total_cmp);
        println!("| {n} | {:.0} µs | {:.0} µs |", samples[100], samples[197]);
    }
    println!();
}

/// Places every VM in arrival order with `strategy`, opening a node when none fits.
fn online(vms: &[(i64, u64)], cap: (i64, u64), strategy: Strategy) -> Vec<Candidate> {
    let mut nodes: Vec<Candidate> = Vec::new();
    for &(cpu, mem) in vms {
        let r = req(cpu, mem);
        let target = match schedule(&r, &nodes, &[], strategy, Weights::default()) {
            Ok(name) => nodes.iter().position(|n| n.name == name).unwrap(),
            Err(_) => {
                nodes.push(node(nodes.len(), cap.0, cap.1));
                nodes.len() - 1
            }
        };
        nodes[target].allocated_cpu += cpu;
        nodes[target].allocated_memory += mem;
    }
    nodes
}

/// All VMs pending at once: one scheduling cycle with `strategy` over a pool of empty
/// nodes; the nodes it uses and how long the cycle took.
fn cycle(vms: &[(i64, u64)], cap: (i64, u64), strategy: Strategy) -> (usize, Duration) {
    let mut nodes: Vec<Candidate> = (0..vms.len()).map(|i| node(i, cap.0, cap.1)).collect();
    let reqs: Vec<Request> = vms.iter().map(|&(c, m)| req(c, m)).collect();
    let t = Instant::now();
    let out = schedule_cycle(
        &reqs,
        &mut nodes,
        &mut Vec::new(),
        strategy,
        Weights::default(),
    );
    let took = t.elapsed();
    assert!(out.iter().all(|d| d.is_ok()), "the pool fits every VM");
    (nodes.iter().filter(|n| n.allocated_cpu > 0).count(), took)
}

/// First-Fit-Decreasing on the larger normalised dimension.
fn ffd(vms: &[(i64, u64)], cap: (i64, u64)) -> usize {
    let mut sorted = vms.to_vec();
    let size = |v: &(i64, u64)| (v.0 as f64 / cap.0 as f64).max(v.1 as f64 / cap.1 as f64);
    sorted.sort_by(|a, b| size(b).total_cmp(&size(a)));
    let mut bins: Vec<(i64, u64)> = Vec::new();
    for (cpu, mem) in sorted {
        match bins
            .iter_mut()
            .find(|b| b.0 + cpu <= cap.0 && b.1 + mem <= cap.1)
        {
            Some(b) => {
                b.0 += cpu;
                b.1 += mem;
            }
            None => bins.push((cpu, mem)),
        }
    }
    bins.len()
}

fn lower_bound(vms: &[(i64, u64)], cap: (i64, u64)) -> usize {
    let cpu: i64 = vms.iter().map(|v| v.0).sum();
    let mem: u64 = vms.iter().map(|v| v.1).sum();
    (cpu as f64 / cap.0 as f64)
        .max(mem as f64 / cap.1 as f64)
        .ceil() as usize
}

fn packing() {
    println!("### Packing quality\n");
    println!(
        "Hypervisors of 32 vCPUs and 128 GiB. `pack` online places VMs in arrival order, one scheduling cycle each (VMs created one by one); `pack` in one cycle has them all pending at once (a burst) and keeps the best of three plans (best fit largest first, first fit largest first, best fit in arrival order; docs/scheduling.md), over a pool of as many empty hypervisors as VMs; FFD is First-Fit-Decreasing (offline). Lower bound: ceil(total demand / capacity) on the tighter resource.\n"
    );
    println!(
        "| instance | VMs | lower bound | pack (online) | pack (one cycle) | FFD (offline) | pack online / bound | one cycle / FFD | the cycle took |\n|---|---|---|---|---|---|---|---|---|"
    );
    let cap = (32i64, 128 * GI);
    let mut rng = Rng(42);
    let uniform: Vec<(i64, u64)> = (0..1000)
        .map(|_| (rng.range(1, 8) as i64, rng.range(1, 32) * GI))
        .collect();
    // Adversarial for online packing: small VMs first, then ones just over half a node.
    let mut adversarial: Vec<(i64, u64)> = (0..300).map(|_| (2, 8 * GI)).collect();
    adversarial.extend((0..150).map(|_| (17, 66 * GI)));
    let tshirt: Vec<(i64, u64)> = (0..1000)
        .map(|_| {
            [
                (1, 2 * GI),
                (2, 4 * GI),
                (4, 16 * GI),
                (8, 32 * GI),
                (16, 64 * GI),
            ][rng.range(0, 4) as usize]
        })
        .collect();
    for (name, vms) in [
        ("uniform random", &uniform),
        ("t-shirt sizes", &tshirt),
        ("adversarial (small, then >1/2)", &adversarial),
    ] {
        let lb = lower_bound(vms, cap);
        let p = online(vms, cap, Strategy::Pack).len();
        let (c, took) = cycle(vms, cap, Strategy::Pack);
        let f = ffd(vms, cap);
        println!(
            "| {name} | {} | {lb} | {p} | {c} | {f} | {:.3} | {:.3} | {:.0} ms |",
            vms.len(),
            p as f64 / lb as f64,
            c as f64 / f as f64,
            took.as_secs_f64() * 1e3
        );
    }
    println!();
}

fn imbalance() {
    println!("### Balance under spread\n");
    println!(
        "1,000 uniform random VMs on 50 hypervisors of 64 vCPUs and 256 GiB; coefficient of variation (std / mean) of per-node memory utilisation.\n"
    );
    println!("| strategy | CV of memory utilisation | CV of cpu utilisation |\n|---|---|---|");
    let mut rng = Rng(99);
    let vms: Vec<(i64, u64)> = (0..1000)
        .map(|_| (rng.range(1, 4) as i64, rng.range(1, 12) * GI))
        .collect();
    for strategy in [Strategy::Spread, Strategy::Balanced, Strategy::Pack] {
        let mut nodes: Vec<Candidate> = (0..50).map(|i| node(i, 64, 256 * GI)).collect();
        for &(cpu, mem) in &vms {
            if let Ok(name) = schedule(&req(cpu, mem), &nodes, &[], strategy, Weights::default()) {
                let n = nodes.iter_mut().find(|n| n.name == name).unwrap();
                n.allocated_cpu += cpu;
                n.allocated_memory += mem;
            }
        }
        let cv = |u: Vec<f64>| {
            let mean = u.iter().sum::<f64>() / u.len() as f64;
            let var = u.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / u.len() as f64;
            var.sqrt() / mean
        };
        let mem = cv(nodes
            .iter()
            .map(|n| n.allocated_memory as f64 / n.allocatable_memory as f64)
            .collect());
        let cpu = cv(nodes
            .iter()
            .map(|n| n.allocated_cpu as f64 / n.allocatable_cpu as f64)
            .collect());
        println!("| {strategy:?} | {mem:.3} | {cpu:.3} |");
    }
    println!();
}

fn main() {
    println!("## Scheduler\n");
    decision_latency();
    packing();
    imbalance();
}
