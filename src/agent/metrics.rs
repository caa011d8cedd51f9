//! The agent's `/metrics` (Prometheus text) and `/healthz`.

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
use crate::http::Reply;

/// A failed reconcile: which controller of the agent, and what failed.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    controller: &'static str,
    kind: &'static str,
}

/// An outbound live migration's event.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MigrationLabels {
    event: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VmLabels {
    namespace: String,
    name: String,
}

/// One series per VM bound to this node, value 1: joins its phase and node to the
/// per-VM counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VmInfoLabels {
    namespace: String,
    name: String,
    phase: String,
    node: String,
}

/// The agent's own metrics, registered once; the per-VM series are read from libvirt
/// and the VM cache at each scrape.
pub struct Metrics {
    registry: Registry,
    reconciles: Counter,
    reconcile_seconds: Histogram,
    errors: Family<ErrorLabels, Counter>,
    status_writes: Counter,
    orphans_removed: Counter,
    fencings: Counter,
    fences_skipped: Counter,
    migrations: Family<MigrationLabels, Counter>,
    migration_seconds: Histogram,
    migration_downtime_seconds: Histogram,
    vms: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let m = Metrics {
            registry: Registry::default(),
            reconciles: Counter::default(),
            reconcile_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
            errors: Family::default(),
            status_writes: Counter::default(),
            orphans_removed: Counter::default(),
            fencings: Counter::default(),
            fences_skipped: Counter::default(),
            migrations: Family::default(),
            migration_seconds: Histogram::new(exponential_buckets(0.25, 2.0, 12)),
            migration_downtime_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
            vms: Gauge::default(),
        };
        // Present at 0 from the start, so that increase() and alerts on them see a
        // series before the first migration.
        for event in ["started", "succeeded", "failed"] {
            let _ = m.migrations.get_or_create(&MigrationLabels { event });
        }
        m.register()
    }
}

impl Metrics {
    fn register(mut self) -> Self {
        let mut reg = Registry::default();
        reg.register(
            "vmlet_build",
            "The running vmlet's version",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        let agent = reg.sub_registry_with_prefix("vmlet_agent");
        agent.register("reconciles", "VM reconciles run", self.reconciles.clone());
        agent.register(
            "reconcile_duration_seconds",
            "Time one VM reconcile took",
            self.reconcile_seconds.clone(),
        );
        agent.register(
            "reconcile_errors",
            "Failed reconciles, once each: by controller (vm, migration) and kind",
            self.errors.clone(),
        );
        agent.register(
            "status_writes",
            "VM status patches sent",
            self.status_writes.clone(),
        );
        agent.register(
            "orphaned_domains_removed",
            "Domains removed because their VM was gone",
            self.orphans_removed.clone(),
        );
        agent.register(
            "fencings",
            "Times the agent fenced itself (destroyed its domains)",
            self.fencings.clone(),
        );
        agent.register(
            "fences_skipped",
            "Times the fence delay passed but a majority of hypervisors could not reach the API server either (an outage): domains kept",
            self.fences_skipped.clone(),
        );
        agent.register(
            "migrations",
            "Outbound live migrations by event (started, succeeded, failed, settled-*)",
            self.migrations.clone(),
        );
        agent.register(
            "migration_duration_seconds",
            "Time an outbound live migration took, start to switch-over or failure",
            self.migration_seconds.clone(),
        );
        agent.register(
            "migration_downtime_seconds",
            "Guest pause at the switch-over of a live migration, as libvirt reports it",
            self.migration_downtime_seconds.clone(),
        );
        agent.register("vms", "VMs bound to this node", self.vms.clone());
        self.registry = reg;
        self
    }

    /// One VM reconcile ran (its error, if any, is counted by the error policy).
    pub fn reconciled(&self, took: Duration) {
        self.reconciles.inc();
        self.reconcile_seconds.observe(took.as_secs_f64());
    }

    /// A failed reconcile of one of the agent's controllers ("vm", "migration").
    pub fn reconcile_error(&self, controller: &'static str, kind: &'static str) {
        self.errors
            .get_or_create(&ErrorLabels { controller, kind })
            .inc();
    }

    pub fn status_written(&self) {
        self.status_writes.inc();
    }

    pub fn orphan_removed(&self) {
        self.orphans_removed.inc();
    }

    /// A migration from this node: started, succeeded, failed, settled-*.
    pub fn migration(&self, event: &'static str) {
        self.migrations
            .get_or_create(&MigrationLabels { event })
            .inc();
    }

    pub fn migration_done(&self, ok: bool, took: Duration, downtime_s: Option<f64>) {
        self.migration(if ok { "succeeded" } else { "failed" });
        self.migration_seconds.observe(took.as_secs_f64());
        if let Some(d) = downtime_s {
            self.migration_downtime_seconds.observe(d);
        }
    }

    pub fn fenced(&self) {
        self.fencings.inc();
    }

    pub fn fence_skipped(&self) {
        self.fences_skipped.inc();
    }
}

/// A peer asks, before it fences, whether this agent reaches the API server: it does when
/// its Lease was renewed within the Lease's duration. The answer is bound to the asker's
/// nonce by the shared key.
fn peer_answer(ctx: &Context, req: &crate::http::Request) -> Reply {
    let Some(key) = &ctx.peer_key else {
        return Reply::error(404, "no peer key configured");
    };
    let nonce = req
        .query
        .as_deref()
        .unwrap_or_default()
        .split('&')
        .find_map(|kv| kv.strip_prefix("nonce="))
        .filter(|n| (16..=128).contains(&n.len()) && n.bytes().all(|b| b.is_ascii_hexdigit()));
    let Some(nonce) = nonce else {
        return Reply::error(400, "nonce: 16 to 128 hex digits");
    };
    let renewed = ctx.last_renewal.lock().expect("not poisoned").elapsed();
    let reachable = renewed < Duration::from_secs(ctx.args.lease_duration_seconds.max(1));
    let a = super::peers::answer(key, nonce, &ctx.node, reachable);
    Reply::ok(
        "application/json",
        serde_json::to_vec(&a).expect("serializable"),
    )
}

/// Encodes the registered metrics plus per-VM series taken now.
async fn render(ctx: &Context) -> String {
    let m = &ctx.metrics;
    let bound = ctx.vms.state();
    m.vms.set(bound.len() as i64);
    let info = Family::<VmInfoLabels, Gauge>::default();
    for vm in &bound {
        let (Some(namespace), Some(name)) =
            (vm.metadata.namespace.clone(), vm.metadata.name.clone())
        else {
            continue;
        };
        let phase = vm
            .status
            .as_ref()
            .and_then(|s| s.phase)
            .map_or("", |p| p.as_str());
        info.get_or_create(&VmInfoLabels {
            namespace,
            name,
            phase: phase.to_string(),
            node: ctx.node.clone(),
        })
        .set(1);
    }
    let cpu = Family::<VmLabels, Counter<f64>>::default();
    let mem = Family::<VmLabels, Gauge<i64>>::default();
    let disk_rd = Family::<VmLabels, Counter>::default();
    let disk_wr = Family::<VmLabels, Counter>::default();
    let net_rx = Family::<VmLabels, Counter>::default();
    let net_tx = Family::<VmLabels, Counter>::default();
    if let Ok(stats) = ctx.lv.stats().await {
        let by_uid: std::collections::HashMap<String, (String, String)> = ctx
            .vms
            .state()
            .iter()
            .filter_map(|vm| {
                Some((
                    vm.metadata.uid.clone()?,
                    (vm.metadata.namespace.clone()?, vm.metadata.name.clone()?),
                ))
            })
            .collect();
        for s in stats {
            let Some((namespace, name)) = by_uid.get(&s.uuid).cloned() else {
                continue;
            };
            let l = VmLabels { namespace, name };
            cpu.get_or_create(&l).inc_by(s.cpu_time_ns as f64 / 1e9);
            mem.get_or_create(&l).set(s.memory_bytes as i64);
            disk_rd.get_or_create(&l).inc_by(s.disk_read_bytes);
            disk_wr.get_or_create(&l).inc_by(s.disk_write_bytes);
            net_rx.get_or_create(&l).inc_by(s.net_rx_bytes);
            net_tx.get_or_create(&l).inc_by(s.net_tx_bytes);
        }
    }
    let mut vm_reg = Registry::with_prefix("vmlet_vm");
    vm_reg.register("info", "VMs bound to this node, with their phase", info);
    vm_reg.register("cpu_seconds", "vCPU time the VM used", cpu);
    vm_reg.register("memory_bytes", "Memory the balloon reports as current", mem);
    vm_reg.register("disk_read_bytes", "Bytes read from the VM's disks", disk_rd);
    vm_reg.register(
        "disk_written_bytes",
        "Bytes written to the VM's disks",
        disk_wr,
    );
    vm_reg.register(
        "network_receive_bytes",
        "Bytes the VM's interfaces received",
        net_rx,
    );
    vm_reg.register(
        "network_transmit_bytes",
        "Bytes the VM's interfaces sent",
        net_tx,
    );

    let mut out = String::new();
    let _ = prometheus_client::encoding::text::encode_registry(&mut out, &m.registry);
    let _ = prometheus_client::encoding::text::encode(&mut out, &vm_reg);
    out
}

/// Serves /metrics, /healthz and /console/{namespace}/{name}.
pub async fn serve(listener: tokio::net::TcpListener, ctx: Arc<Context>) {
    crate::http::serve_requests(listener, move |req| {
        let ctx = ctx.clone();
        async move {
            match req.path.as_str() {
                "/metrics" => Reply::ok(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    render(&ctx).await,
                ),
                "/healthz" => match ctx.lv.down() {
                    None => Reply::ok("text/plain", "ok\n"),
                    Some(why) => Reply::error(503, format!("libvirt unreachable: {why}")),
                },
                "/peer/apiserver" => peer_answer(&ctx, &req),
                _ => Reply::error(404, "not found"),
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `vmlet_agent_*` series the chart's alerts and dashboard query is one this agent exports.
    #[test]
    fn the_chart_alerts_query_metrics_the_agent_exports() {
        let m = Metrics::default();
        // Labelled families appear with their first series.
        m.reconcile_error("vm", "example");
        let mut text = String::new();
        prometheus_client::encoding::text::encode_registry(&mut text, &m.registry).unwrap();
        let rules = [
            include_str!("../../charts/vmlet/templates/prometheusrule.yaml"),
            include_str!("../../charts/vmlet/dashboards/vmlet.json"),
        ]
        .concat();
        let queried = crate::telemetry::metric_names(&rules, "vmlet_agent_");
        assert!(queried.len() >= 2, "{queried:?}");
        let missing = crate::telemetry::unexported(&text, &queried);
        assert!(
            missing.is_empty(),
            "the chart queries {missing:?}, which the agent does not export"
        );
    }
}
