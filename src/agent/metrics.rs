//! The agent's `/metrics` (Prometheus text) and `/healthz`.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use super::Context;
use crate::http::Reply;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VmLabels {
    namespace: String,
    name: String,
}

pub struct Metrics {
    reconciles: Counter,
    reconcile_seconds: Histogram,
    errors: Family<ErrorLabels, Counter>,
    status_writes: Counter,
    orphans_removed: Counter,
    fencings: Counter,
    fences_skipped: Counter,
    migrations: Family<ErrorLabels, Counter>,
    migration_seconds: Histogram,
    migration_downtime_seconds: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
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
        }
    }
}

impl Metrics {
    pub fn reconciled(&self, took: Duration, error: Option<&str>) {
        self.reconciles.inc();
        self.reconcile_seconds.observe(took.as_secs_f64());
        if let Some(kind) = error {
            self.error(kind);
        }
    }

    pub fn error(&self, kind: &str) {
        self.errors
            .get_or_create(&ErrorLabels {
                kind: kind.to_string(),
            })
            .inc();
    }

    pub fn status_written(&self) {
        self.status_writes.inc();
    }

    pub fn orphan_removed(&self) {
        self.orphans_removed.inc();
    }

    /// A migration from this node: "started", "succeeded" or "failed".
    pub fn migration(&self, what: &str) {
        self.migrations
            .get_or_create(&ErrorLabels {
                kind: what.to_string(),
            })
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

/// Encodes the counters above plus per-VM libvirt stats taken now.
async fn render(ctx: &Context) -> String {
    let mut reg = Registry::with_prefix("vmlet_agent");
    let m = &ctx.metrics;
    reg.register("reconciles", "VM reconciles run", m.reconciles.clone());
    reg.register(
        "reconcile_duration_seconds",
        "Time one VM reconcile took",
        m.reconcile_seconds.clone(),
    );
    reg.register(
        "reconcile_errors",
        "Reconcile errors by kind",
        m.errors.clone(),
    );
    reg.register(
        "status_writes",
        "VM status patches sent",
        m.status_writes.clone(),
    );
    reg.register(
        "orphaned_domains_removed",
        "Domains removed because their VM was gone",
        m.orphans_removed.clone(),
    );
    reg.register(
        "fencings",
        "Times the agent fenced itself (destroyed its domains)",
        m.fencings.clone(),
    );
    reg.register(
        "fences_skipped",
        "Times the fence delay passed but a majority of hypervisors could not reach the API server either (an outage): domains kept",
        m.fences_skipped.clone(),
    );
    reg.register(
        "migrations",
        "Outbound live migrations by event (kind: started, succeeded, failed)",
        m.migrations.clone(),
    );
    reg.register(
        "migration_duration_seconds",
        "Time an outbound live migration took, start to switch-over or failure",
        m.migration_seconds.clone(),
    );
    reg.register(
        "migration_downtime_seconds",
        "Guest pause at the switch-over of a live migration, as libvirt reports it",
        m.migration_downtime_seconds.clone(),
    );
    let vms = Gauge::<i64>::default();
    vms.set(ctx.vms.state().len() as i64);
    reg.register("vms", "VMs bound to this node", vms);

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
    let _ = prometheus_client::encoding::text::encode_registry(&mut out, &reg);
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
                p if p.starts_with("/console/") => super::console::handle(&ctx, req).await,
                _ => Reply::error(404, "not found"),
            }
        }
    })
    .await;
}
