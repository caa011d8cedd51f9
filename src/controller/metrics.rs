//! The controller's `/metrics` and `/healthz`.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

use super::Context;
use crate::api::conditions;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: String,
}

/// A failed reconcile: which of the controller's loops, and what failed.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    controller: &'static str,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabel {
    phase: String,
}

/// The controller's own metrics, registered once; the per-phase gauges are counted from
/// the caches at each scrape.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    attempts: Family<ResultLabel, Counter>,
    latency: Family<ResultLabel, Histogram>,
    errors: Family<ErrorLabels, Counter>,
    leader: Gauge,
    evictions: Family<ResultLabel, Counter>,
    migrations: Family<ResultLabel, Counter>,
    migration_latency: Histogram,
    imbalance: Gauge<f64, std::sync::atomic::AtomicU64>,
    planned_moves: Gauge,
    lost_hypervisors: Gauge,
    hypervisors: Gauge,
    failover_held: Gauge,
    cycle_size: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut m = Metrics {
            registry: Arc::new(Registry::default()),
            attempts: Family::default(),
            latency: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0005, 2.0, 16))
            }),
            errors: Family::default(),
            leader: Gauge::default(),
            evictions: Family::default(),
            migrations: Family::default(),
            migration_latency: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            imbalance: Gauge::default(),
            planned_moves: Gauge::default(),
            lost_hypervisors: Gauge::default(),
            hypervisors: Gauge::default(),
            failover_held: Gauge::default(),
            cycle_size: Histogram::new(exponential_buckets(1.0, 2.0, 12)),
        };
        m.registry = Arc::new(m.registry_of());
        m
    }
}

impl Metrics {
    fn registry_of(&self) -> Registry {
        let mut reg = Registry::default();
        reg.register(
            "vmlet_build",
            "The running vmlet's version",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        let c = reg.sub_registry_with_prefix("vmlet_controller");
        c.register(
            "scheduling_attempts",
            "VM placements by result (scheduled, unschedulable, error)",
            self.attempts.clone(),
        );
        c.register(
            "scheduling_duration_seconds",
            "Time from decision start to bind",
            self.latency.clone(),
        );
        c.register(
            "reconcile_errors",
            "Failed reconciles, once each: by controller (placement, migration) and kind",
            self.errors.clone(),
        );
        c.register(
            "leader",
            "1 while this replica is the leader",
            self.leader.clone(),
        );
        c.register(
            "node_loss_evictions",
            "VMs of lost nodes, by result (moved, marked-unknown)",
            self.evictions.clone(),
        );
        c.register(
            "utilisation_imbalance",
            "Coefficient of variation of hypervisor utilisation, as the rebalancer last saw it",
            self.imbalance.clone(),
        );
        c.register(
            "rebalance_planned_moves",
            "Migrations the rebalancer's last plan asked for (or would, in plan mode)",
            self.planned_moves.clone(),
        );
        c.register(
            "lost_hypervisors",
            "Labelled Nodes whose heartbeat is silent past the fencing bound",
            self.lost_hypervisors.clone(),
        );
        c.register(
            "hypervisors",
            "Labelled Nodes with a heartbeat Lease: what lost_hypervisors is counted against",
            self.hypervisors.clone(),
        );
        c.register(
            "failover_held_back",
            "1 while more than half of the hypervisors are silent and no VM is moved off them",
            self.failover_held.clone(),
        );
        c.register(
            "scheduling_cycle_size",
            "VMs decided together in one scheduling cycle (largest first)",
            self.cycle_size.clone(),
        );
        c.register(
            "migration_decisions",
            "Migration admission decisions by result (scheduled, refused, or why it waits)",
            self.migrations.clone(),
        );
        c.register(
            "migration_decision_duration_seconds",
            "Time one migration admission decision took",
            self.migration_latency.clone(),
        );
        reg
    }

    pub fn attempt(&self, result: &str, took: Duration) {
        let l = ResultLabel {
            result: result.to_string(),
        };
        self.attempts.get_or_create(&l).inc();
        self.latency.get_or_create(&l).observe(took.as_secs_f64());
    }

    /// A scheduling cycle decided `vms` VMs.
    pub fn cycle(&self, vms: usize) {
        self.cycle_size.observe(vms as f64);
    }

    /// A failed reconcile of one of the controller's loops ("placement", "migration",
    /// "images").
    pub fn reconcile_error(&self, controller: &'static str, kind: &'static str) {
        self.errors
            .get_or_create(&ErrorLabels { controller, kind })
            .inc();
    }

    pub fn evicted(&self, moved: bool) {
        let result = if moved { "moved" } else { "marked-unknown" };
        self.evictions
            .get_or_create(&ResultLabel {
                result: result.into(),
            })
            .inc();
    }

    pub fn migration_decision(&self, v: &super::migrate::Verdict, took: Duration) {
        let result = match v {
            super::migrate::Verdict::Go { .. } => "scheduled",
            super::migrate::Verdict::Wait { reason, .. } => reason,
            super::migrate::Verdict::Refuse { .. } => "refused",
        };
        self.migrations
            .get_or_create(&ResultLabel {
                result: result.to_string(),
            })
            .inc();
        self.migration_latency.observe(took.as_secs_f64());
    }

    pub fn set_imbalance(&self, cv: f64) {
        self.imbalance.set(cv);
    }

    pub fn set_planned_moves(&self, n: usize) {
        self.planned_moves.set(n as i64);
    }

    pub fn set_node_loss(&self, lost: usize, total: usize, held: bool) {
        self.lost_hypervisors.set(lost as i64);
        self.hypervisors.set(total as i64);
        self.failover_held.set(i64::from(held));
    }

    pub fn set_leader(&self, leader: bool) {
        self.leader.set(i64::from(leader));
    }
}

/// One gauge per phase: how many objects are in it; every phase of `all` is present,
/// at 0 when empty, so that alerts on a phase see a series.
fn count_phases(phases: Vec<&str>, all: &[&str]) -> Family<PhaseLabel, Gauge<i64>> {
    let family = Family::<PhaseLabel, Gauge<i64>>::default();
    for phase in all {
        let _ = family.get_or_create(&PhaseLabel {
            phase: phase.to_string(),
        });
    }
    for phase in phases {
        family
            .get_or_create(&PhaseLabel {
                phase: phase.to_string(),
            })
            .inc();
    }
    family
}

/// Encodes the registered metrics plus the gauges counted from the caches now.
fn render(m: &Metrics, ctx: Option<&Context>) -> String {
    let mut reg = Registry::with_prefix("vmlet_controller");
    let unschedulable = Gauge::<i64>::default();
    let (mut vm_phases, mut migration_phases, mut image_phases) = (vec![], vec![], vec![]);
    if let Some(ctx) = ctx {
        for vm in ctx.caches.vms.state() {
            let st = vm.status.as_ref();
            if st
                .and_then(|s| conditions::find(&s.conditions, conditions::Type::Scheduled))
                .is_some_and(|c| c.status == "False")
            {
                unschedulable.inc();
            }
            vm_phases.push(st.and_then(|s| s.phase).map_or("Pending", |p| p.as_str()));
        }
        for mig in ctx.caches.migrations.state() {
            let phase = mig.status.as_ref().and_then(|s| s.phase);
            migration_phases.push(phase.map_or("Pending", |p| p.as_str()));
        }
        for img in ctx.caches.images.state() {
            let phase = img.status.as_ref().and_then(|s| s.phase);
            image_phases.push(phase.unwrap_or_default().as_str());
        }
    }
    reg.register(
        "unschedulable_vms",
        "VMs no hypervisor can take now",
        unschedulable,
    );
    reg.register(
        "vms",
        "VMs by phase",
        count_phases(vm_phases, &["Pending", "Running"]),
    );
    reg.register(
        "migrations",
        "VirtualMachineMigrations by phase",
        count_phases(migration_phases, &["Pending", "Failed"]),
    );
    reg.register(
        "images",
        "VirtualMachineImages by phase (Failed: a download or check failed on some node)",
        count_phases(image_phases, &["Ready", "Failed"]),
    );
    let mut out = String::new();
    let _ = prometheus_client::encoding::text::encode_registry(&mut out, &m.registry);
    let _ = prometheus_client::encoding::text::encode(&mut out, &reg);
    out
}

pub async fn serve(
    listener: tokio::net::TcpListener,
    ctx: Arc<tokio::sync::OnceCell<Arc<Context>>>,
    m: Metrics,
) {
    crate::http::serve(listener, move |path| {
        let (ctx, m) = (ctx.clone(), m.clone());
        async move {
            match path.as_str() {
                "/metrics" => Some((
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    render(&m, ctx.get().map(|c| &**c)).into(),
                )),
                "/healthz" => Some(("text/plain", "ok\n".into())),
                _ => None,
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `vmlet_controller_*` series the chart's alerts and dashboard query is one the controller
    /// exports (those counted from the caches included).
    #[test]
    fn the_chart_alerts_query_metrics_the_controller_exports() {
        let m = Metrics::default();
        // Labelled families appear with their first series.
        m.reconcile_error("placement", "example");
        m.attempt("scheduled", Duration::from_millis(1));
        let text = render(&m, None);
        let rules = [
            include_str!("../../charts/vmlet/templates/prometheusrule.yaml"),
            include_str!("../../charts/vmlet/dashboards/vmlet.json"),
        ]
        .concat();
        let queried = crate::telemetry::metric_names(&rules, "vmlet_controller_");
        assert!(queried.len() >= 4, "{queried:?}");
        let missing = crate::telemetry::unexported(&text, &queried);
        assert!(
            missing.is_empty(),
            "the chart queries {missing:?}, which the controller does not export"
        );
    }
}
