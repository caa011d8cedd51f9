//! The controller's `/metrics` and `/healthz`.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use super::Context;
use crate::api::conditions;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabel {
    phase: String,
}

#[derive(Clone)]
pub struct Metrics {
    attempts: Family<ResultLabel, Counter>,
    latency: Family<ResultLabel, Histogram>,
    errors: Family<KindLabel, Counter>,
    leader: Gauge,
    evictions: Family<ResultLabel, Counter>,
    migrations: Family<ResultLabel, Counter>,
    imbalance: Gauge<f64, std::sync::atomic::AtomicU64>,
    planned_moves: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            attempts: Family::default(),
            latency: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0005, 2.0, 16))
            }),
            errors: Family::default(),
            leader: Gauge::default(),
            evictions: Family::default(),
            migrations: Family::default(),
            imbalance: Gauge::default(),
            planned_moves: Gauge::default(),
        }
    }
}

impl Metrics {
    pub fn attempt(&self, result: &str, took: Duration) {
        let l = ResultLabel {
            result: result.to_string(),
        };
        self.attempts.get_or_create(&l).inc();
        self.latency.get_or_create(&l).observe(took.as_secs_f64());
    }

    pub fn error(&self, kind: &str) {
        self.errors
            .get_or_create(&KindLabel {
                kind: kind.to_string(),
            })
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
        self.attempt("migration", took);
    }

    pub fn set_imbalance(&self, cv: f64) {
        self.imbalance.set(cv);
    }

    pub fn set_planned_moves(&self, n: usize) {
        self.planned_moves.set(n as i64);
    }

    pub fn set_leader(&self, leader: bool) {
        self.leader.set(i64::from(leader));
    }
}

fn render(m: &Metrics, ctx: Option<&Context>) -> String {
    let mut reg = Registry::with_prefix("vmlet_controller");
    reg.register(
        "scheduling_attempts",
        "Scheduling attempts by result",
        m.attempts.clone(),
    );
    reg.register(
        "scheduling_duration_seconds",
        "Time from decision start to bind",
        m.latency.clone(),
    );
    reg.register(
        "reconcile_errors",
        "Reconcile errors by kind",
        m.errors.clone(),
    );
    reg.register(
        "leader",
        "1 while this replica is the leader",
        m.leader.clone(),
    );
    let unschedulable = Gauge::<i64>::default();
    let by_phase = Family::<PhaseLabel, Gauge<i64>>::default();
    if let Some(ctx) = ctx {
        for vm in ctx.caches.vms.state() {
            let st = vm.status.clone().unwrap_or_default();
            if conditions::find(&st.conditions, "Scheduled").is_some_and(|c| c.status == "False") {
                unschedulable.inc();
            }
            let phase = st.phase.map(|p| p.as_str()).unwrap_or("Pending");
            by_phase
                .get_or_create(&PhaseLabel {
                    phase: phase.to_string(),
                })
                .inc();
        }
    }
    reg.register(
        "unschedulable_vms",
        "VMs no hypervisor can take now",
        unschedulable,
    );
    reg.register("vms", "VMs by phase", by_phase);
    reg.register(
        "utilisation_imbalance",
        "Coefficient of variation of hypervisor utilisation, as the rebalancer last saw it",
        m.imbalance.clone(),
    );
    reg.register(
        "rebalance_planned_moves",
        "Migrations the rebalancer's last plan asked for (or would, in plan mode)",
        m.planned_moves.clone(),
    );
    reg.register(
        "migration_decisions",
        "Migration admission decisions by result (scheduled, refused, or why it waits)",
        m.migrations.clone(),
    );
    let migrations = Family::<PhaseLabel, Gauge<i64>>::default();
    if let Some(ctx) = ctx {
        for mig in ctx.caches.migrations.state() {
            let phase = mig
                .status
                .as_ref()
                .and_then(|s| s.phase)
                .map(|p| p.as_str())
                .unwrap_or("Pending");
            migrations
                .get_or_create(&PhaseLabel {
                    phase: phase.to_string(),
                })
                .inc();
        }
    }
    reg.register(
        "migrations",
        "VirtualMachineMigrations by phase",
        migrations,
    );
    let mut out = String::new();
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
