//! The cluster-wide controller: keeps an inventory of hypervisors and places each new
//! VirtualMachine on one of them. Leader-elected: only one replica binds at a time.

mod bind;
pub mod binding;
pub mod images;
pub mod inventory;
mod metrics;
mod migrate;
pub mod nodeloss;
pub mod rebalance;
mod release;
pub mod scheduler;
pub mod selector;
pub mod services;
pub mod vmpod;
pub mod volumes;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use kube::runtime::controller::Controller;
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};

use crate::watch::slim;

use crate::api::{Hypervisor, VirtualMachine, VirtualMachineClass, VirtualMachineMigration};
use inventory::{Caches, View};
use scheduler::{Strategy, Weights};

/// The field manager of everything the controller writes.
pub const FIELD_MANAGER: &str = "vmlet-controller";

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// How to score hypervisors that fit: spread (balance load), pack (fill nodes) or
    /// balanced (even cpu and memory use per node).
    #[arg(long, env = "VMLET_STRATEGY", value_enum, default_value = "spread")]
    pub strategy: Strategy,
    /// Weight of cpu in the spread and pack scores.
    #[arg(long, default_value = "1.0")]
    pub cpu_weight: f64,
    /// Weight of memory in the spread and pack scores.
    #[arg(long, default_value = "1.0")]
    pub memory_weight: f64,
    /// Address of /metrics and /healthz.
    #[arg(long, default_value = "127.0.0.1:9465")]
    pub metrics_addr: String,
    /// Namespace of the leader-election Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "kube-system")]
    pub lease_namespace: String,
    /// The leader-election Lease's name: one per installation (the chart derives it from
    /// the release), so that two in one namespace elect their own leaders.
    #[arg(long, env = "VMLET_LEADER_LEASE", default_value = crate::api::LEADER_LEASE)]
    pub leader_lease: String,
    /// This replica's identity in the leader-election Lease.
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Seconds a leader holds the Lease without renewing it.
    #[arg(long, default_value = "10")]
    pub lease_duration_seconds: u64,
    /// Seconds a hypervisor's heartbeat may be late beyond its lease duration before the
    /// node stops taking new VMs.
    #[arg(long, default_value = "5")]
    pub heartbeat_grace_seconds: u64,
    /// The agents' --fence-after-seconds: a node is lost, and its VMs move, once its
    /// heartbeat has been silent for lease duration + this + --loss-margin-seconds.
    #[arg(long, default_value = "60")]
    pub fence_after_seconds: u64,
    /// Extra wait before a silent node counts as lost (clock skew, fencing time).
    #[arg(long, default_value = "10")]
    pub loss_margin_seconds: u64,
    /// Migrations that may run at once from one node.
    #[arg(long, default_value = "2")]
    pub max_migrations_per_node: usize,
    /// Migrations that may run at once in the cluster.
    #[arg(long, default_value = "5")]
    pub max_migrations: usize,
    /// The rebalancer: off, plan (log and export the moves it would make) or migrate.
    #[arg(long, value_enum, default_value = "off")]
    pub rebalance: rebalance::Mode,
    /// Coefficient of variation of node utilisation above which the rebalancer plans.
    #[arg(long, default_value = "0.25")]
    pub rebalance_threshold: f64,
    /// Most migrations one rebalance round asks for.
    #[arg(long, default_value = "3")]
    pub rebalance_max_moves: usize,
    /// Seconds between rebalance rounds.
    #[arg(long, default_value = "60")]
    pub rebalance_interval_seconds: u64,
    /// Kubeconfig to use instead of in-cluster config or $KUBECONFIG.
    #[arg(long, env = "VMLET_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// The image of the VM Pods' placeholder container: the vmlet image (the chart
    /// passes its own).
    #[arg(long, env = "VMLET_VM_POD_IMAGE", default_value = "vmlet:dev")]
    pub vm_pod_image: String,
}

impl Default for Args {
    /// What the command line gives when no flag is set.
    fn default() -> Self {
        use clap::{Args as _, FromArgMatches};
        let cmd = Self::augment_args(clap::Command::new("controller"));
        Self::from_arg_matches(&cmd.get_matches_from(["controller"]))
            .expect("the flags' defaults parse")
    }
}

/// A VM queued for a scheduling cycle: its uid, what it asks, where the decision goes.
pub type Queued = (
    String,
    scheduler::Request,
    tokio::sync::oneshot::Sender<Result<String, scheduler::Unschedulable>>,
);

pub struct Context {
    pub client: Client,
    pub caches: Caches,
    /// Placements not yet visible in the VM cache, and the snapshot decisions use. The
    /// lock is held from snapshot to assumption, so concurrent reconciles never place
    /// against stale allocation.
    pub view: tokio::sync::Mutex<View>,
    /// VMs waiting for the next scheduling cycle, each with where its answer goes.
    pub cycle: std::sync::Mutex<Vec<Queued>>,
    /// Bumped by every event that may make a hypervisor eligible or ineligible.
    pub epoch: std::sync::atomic::AtomicU64,
    pub strategy: Strategy,
    pub weights: Weights,
    pub heartbeat_grace: Duration,
    /// The agents' fence delay plus the loss margin: past it (and the Lease's duration)
    /// a silent node's domains are destroyed.
    pub fencing_bound: Duration,
    pub limits: migrate::Limits,
    pub metrics: metrics::Metrics,
    /// The VM Pods, by VM, and every other Pod (for what they take of a node).
    pub pods: vmpod::Pods,
    pub vm_pod_image: String,
    /// VMs whose Pod a kubelet refused, and when: they wait a moment before the next try.
    pub refused: std::sync::Mutex<HashMap<String, std::time::Instant>>,
}

impl Context {
    /// Records an Event on `obj` off the caller's path: an Event is news for people, and
    /// must not delay the next decision when the API server is busy. Written as it is
    /// (events.k8s.io/v1), without kube's Recorder: its series cache keeps every Event
    /// for minutes and walks them all on each publish, which a full cluster's thousands
    /// of FailedScheduling Events turn into tens of MiB and quadratic work. The
    /// controller emits each reason once per change, so there is no series to fold.
    /// `action` is what the controller was doing (Schedule, NodeLoss, Migrate, ...).
    pub fn record<K: kube::Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        type_: kube::runtime::events::EventType,
        reason: &str,
        note: String,
        action: &str,
    ) {
        let reference = obj.object_ref(&());
        let event = new_event(&reference, type_, reason, note, action);
        let api: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(
            self.client.clone(),
            reference.namespace.as_deref().unwrap_or("default"),
        );
        tokio::spawn(async move {
            if let Err(e) = api.create(&Default::default(), &event).await {
                tracing::debug!(error = %e, "event not recorded");
            }
        });
    }
}

/// An events.k8s.io/v1 Event about `regarding`, reported by the controller.
fn new_event(
    regarding: &k8s_openapi::api::core::v1::ObjectReference,
    type_: kube::runtime::events::EventType,
    reason: &str,
    note: String,
    action: &str,
) -> k8s_openapi::api::events::v1::Event {
    let now = k8s_openapi::jiff::Timestamp::now();
    let name = regarding.name.clone().unwrap_or_default();
    k8s_openapi::api::events::v1::Event {
        metadata: kube::api::ObjectMeta {
            // As client-go's recorder names them: object name, then a unique suffix.
            name: Some(format!("{name}.{:x}", now.as_nanosecond())),
            namespace: regarding.namespace.clone(),
            ..Default::default()
        },
        event_time: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
            now,
        )),
        action: Some(action.into()),
        reason: Some(reason.to_string()),
        note: Some(note),
        type_: Some(match type_ {
            kube::runtime::events::EventType::Normal => "Normal".into(),
            kube::runtime::events::EventType::Warning => "Warning".into(),
        }),
        regarding: Some(regarding.clone()),
        reporting_controller: Some(FIELD_MANAGER.into()),
        reporting_instance: Some(FIELD_MANAGER.into()),
        ..Default::default()
    }
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    // Once per process: tests and benchmarks run several controllers and agents in one.
    tokio::spawn(crate::memory::trim_loop());
    run_until(args, crate::shutdown::signal()).await
}

/// Serves /healthz at once, waits to become leader, then schedules until `shutdown`
/// completes or leadership is lost (the error then makes the process exit, and its
/// restart rejoins the election).
pub async fn run_until(
    args: Args,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) -> anyhow::Result<()> {
    let client = crate::kubeconfig::client(args.kubeconfig.as_ref()).await?;
    let identity = args.identity.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        format!("{}-{}", host.trim(), std::process::id())
    });
    let metrics = metrics::Metrics::default();
    let listener = tokio::net::TcpListener::bind(&args.metrics_addr).await?;

    let manager = kube_lease_manager::LeaseManagerBuilder::new(client.clone(), &args.leader_lease)
        .with_namespace(&args.lease_namespace)
        .with_identity(&identity)
        .with_duration(args.lease_duration_seconds)
        .with_grace(2)
        // One field manager per replica: server-side apply conflicts between them are what
        // keeps two replicas from both taking the lease.
        .with_field_manager(format!("{FIELD_MANAGER}-{identity}"))
        .build()
        .await?;
    let (mut leader, lease_task) = manager.watch().await;

    let ctx_cell: Arc<tokio::sync::OnceCell<Arc<Context>>> = Arc::default();
    let serve = metrics::serve(listener, ctx_cell.clone(), metrics.clone());
    let work = async {
        while !*leader.borrow_and_update() {
            leader.changed().await?;
        }
        tracing::info!(%identity, "became leader");
        metrics.set_leader(true);
        let (ctx, writers) = start(client.clone(), &args, metrics.clone()).await?;
        let _ = ctx_cell.set(ctx.clone());
        let lost = async {
            while *leader.borrow_and_update() {
                if leader.changed().await.is_err() {
                    break;
                }
            }
        };
        tokio::select! {
            res = controller(ctx.clone(), writers) => res,
            _ = rebalance::rebalance_loop(ctx.clone(), rebalance::Settings {
                mode: args.rebalance,
                threshold: args.rebalance_threshold,
                max_moves: args.rebalance_max_moves,
                interval: Duration::from_secs(args.rebalance_interval_seconds.max(1)),
            }) => Ok(()),
            _ = nodeloss::node_loss_loop(
                ctx,
                Duration::from_secs(args.fence_after_seconds),
                Duration::from_secs(args.loss_margin_seconds),
            ) => Ok(()),
            _ = lost => {
                metrics.set_leader(false);
                anyhow::bail!("lost leadership of lease {}/{}", args.lease_namespace, args.leader_lease)
            }
        }
    };
    let res = tokio::select! {
        res = work => res,
        _ = serve => Ok(()),
        _ = shutdown => Ok(()),
    };
    // Hand the lease over at once instead of making the next leader wait it out.
    drop(leader);
    if let Ok(Ok(manager)) = lease_task.await {
        let _ = manager.release().await;
    }
    res
}

/// The caches the controller's own streams fill (their events also trigger placement).
struct Writers {
    vms: reflector::store::Writer<VirtualMachine>,
    hypervisors: reflector::store::Writer<Hypervisor>,
    leases: reflector::store::Writer<Lease>,
    /// VMs whose Pod changed (not during a list: placement visits every VM at start).
    pod_changes: futures::channel::mpsc::Receiver<ObjectRef<VirtualMachine>>,
}

/// Starts the caches of what the scheduler only reads and waits until they are filled.
async fn start(
    client: Client,
    args: &Args,
    metrics: metrics::Metrics,
) -> anyhow::Result<(Arc<Context>, Writers)> {
    fn cache<K>(api: Api<K>) -> (reflector::Store<K>, impl futures::Future<Output = ()>)
    where
        K: kube::Resource<DynamicType = ()>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug
            + Send
            + Sync
            + 'static,
    {
        let (store, writer) = reflector::store();
        let stream = reflector::reflector(writer, slim(watcher(api, watcher::Config::default())))
            .default_backoff()
            .for_each(|_| futures::future::ready(()));
        (store, stream)
    }
    let (vms, vm_writer) = reflector::store::<VirtualMachine>();
    let (classes, classes_run) = cache(Api::<VirtualMachineClass>::all(client.clone()));
    let (nodes, nodes_run) = cache(Api::<Node>::all(client.clone()));
    let (migrations, migrations_run) = cache(Api::<VirtualMachineMigration>::all(client.clone()));
    tokio::spawn(migrations_run);
    let (volumes, volumes_run) =
        cache(Api::<crate::api::VirtualMachineVolume>::all(client.clone()));
    tokio::spawn(volumes_run);
    let (snapshots, snapshots_run) = cache(Api::<crate::api::VirtualMachineSnapshot>::all(
        client.clone(),
    ));
    tokio::spawn(snapshots_run);
    let (images, images_run) = cache(Api::<crate::api::VirtualMachineImage>::all(client.clone()));
    tokio::spawn(images_run);
    let (leases, lease_writer) = reflector::store::<Lease>();
    tokio::spawn(classes_run);
    tokio::spawn(nodes_run);
    let (hypervisors, hv_writer) = reflector::store::<Hypervisor>();
    let (pod_store, pod_writer) = reflector::store::<k8s_openapi::api::core::v1::Pod>();
    let pods = vmpod::Pods::new(pod_store.clone());
    let (mut pod_tx, pod_changes) = futures::channel::mpsc::channel(1024);
    {
        use futures::SinkExt;
        let pods = pods.clone();
        let stream = reflector::reflector(
            pod_writer,
            watcher(
                Api::<k8s_openapi::api::core::v1::Pod>::all(client.clone()),
                watcher::Config::default(),
            )
            .modify(vmpod::slim),
        )
        .default_backoff();
        tokio::spawn(async move {
            futures::pin_mut!(stream);
            while let Some(ev) = stream.next().await {
                let Ok(ev) = ev else { continue };
                pods.observe(&ev);
                let (watcher::Event::Apply(p) | watcher::Event::Delete(p)) = &ev else {
                    continue;
                };
                let Some(vm) = p
                    .metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(crate::api::vmpod::VM_LABEL))
                else {
                    continue;
                };
                let r =
                    ObjectRef::new(vm).within(p.metadata.namespace.as_deref().unwrap_or_default());
                if pod_tx.send(r).await.is_err() {
                    return;
                }
            }
        });
    }
    let ctx = Arc::new(Context {
        client: client.clone(),
        caches: Caches {
            vms,
            classes,
            nodes,
            hypervisors,
            leases,
            migrations,
            volumes,
            snapshots,
            images,
            pods: pod_store,
        },
        view: Default::default(),
        cycle: Default::default(),
        epoch: Default::default(),
        strategy: args.strategy,
        weights: Weights {
            cpu: args.cpu_weight,
            memory: args.memory_weight,
        },
        heartbeat_grace: Duration::from_secs(args.heartbeat_grace_seconds),
        fencing_bound: Duration::from_secs(args.fence_after_seconds + args.loss_margin_seconds),
        limits: migrate::Limits {
            per_node: args.max_migrations_per_node,
            cluster: args.max_migrations,
        },
        metrics,
        pods,
        vm_pod_image: args.vm_pod_image.clone(),
        refused: Default::default(),
    });
    ctx.caches.classes.wait_until_ready().await?;
    ctx.caches.pods.wait_until_ready().await?;
    ctx.caches.nodes.wait_until_ready().await?;
    ctx.caches.volumes.wait_until_ready().await?;
    let writers = Writers {
        vms: vm_writer,
        hypervisors: hv_writer,
        leases: lease_writer,
        pod_changes,
    };
    Ok((ctx, writers))
}

/// Every VM still waiting for a place, or for its silent node to be heard from again
/// (NodeHealthy=False: the binder says when it is).
fn pending_vms(vms: &reflector::Store<VirtualMachine>) -> Vec<ObjectRef<VirtualMachine>> {
    vms.state()
        .into_iter()
        .filter(|vm| {
            let Some(status) = vm.status.as_ref() else {
                return true;
            };
            status.node_name.is_none()
                || crate::api::conditions::find(
                    &status.conditions,
                    crate::api::conditions::Type::NodeHealthy,
                )
                .is_some_and(|c| c.status == "False")
        })
        .filter(|vm| vm.metadata.deletion_timestamp.is_none())
        .map(|vm| ObjectRef::from(&*vm))
        .collect()
}

async fn controller(ctx: Arc<Context>, writers: Writers) -> anyhow::Result<()> {
    let Writers {
        vms: vm_writer,
        hypervisors: hv_writer,
        leases: lease_writer,
        pod_changes,
    } = writers;
    let client = ctx.client.clone();
    // One VM watch for placement, volumes and Services.
    let (vm_watch, mut vm_streams) = crate::watch::fan_out(
        reflector::reflector(
            vm_writer,
            slim(watcher(
                Api::<VirtualMachine>::all(client.clone()),
                watcher::Config::default(),
            )),
        )
        .default_backoff()
        .touched_objects(),
        3,
    );
    let (vm_stream, vms_for_volumes, vms_for_services) = (
        vm_streams.remove(0),
        vm_streams.remove(0),
        vm_streams.remove(0),
    );
    let hv_stream = reflector::reflector(
        hv_writer,
        watcher(
            Api::<Hypervisor>::all(client.clone()),
            watcher::Config::default(),
        ),
    )
    .default_backoff()
    .touched_objects();
    // A hypervisor that appears, changes or frees capacity gives every VM still waiting
    // for a place another try; so does a heartbeat that comes back after going stale.
    // Routine renewals (every few seconds per node) do not.
    let lease_stream = reflector::reflector(
        lease_writer,
        watcher(
            Api::<Lease>::namespaced(client.clone(), crate::api::HEARTBEAT_LEASE_NAMESPACE),
            watcher::Config::default(),
        ),
    )
    .default_backoff()
    .touched_objects();
    let grace = ctx.heartbeat_grace;
    let mut last_renew: HashMap<String, k8s_openapi::jiff::Timestamp> = HashMap::new();
    let revived = lease_stream.filter_map(move |l| {
        let revived = l.ok().and_then(|l| {
            let spec = l.spec?;
            let limit = inventory::lease_duration(&spec) + grace;
            let renew = spec.renew_time?.0;
            let prev = last_renew.insert(l.metadata.name?, renew);
            prev.is_none_or(|p| renew.duration_since(p).unsigned_abs() > limit)
                .then_some(())
        });
        futures::future::ready(revived)
    });
    let hv_changed = hv_stream.filter_map(|h| futures::future::ready(h.ok().map(|_| ())));
    let pending = {
        let vms = ctx.caches.vms.clone();
        let ctx = ctx.clone();
        futures::stream::select(hv_changed, revived).flat_map(move |()| {
            ctx.epoch.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            futures::stream::iter(pending_vms(&vms))
        })
    };
    let placement = Controller::for_stream(vm_stream, ctx.caches.vms.clone())
        .reconcile_on(pending)
        .reconcile_on(pod_changes)
        .run(bind::reconcile, bind::error_policy, ctx.clone())
        .for_each(|_| futures::future::ready(()));
    let migrations = Controller::new(
        Api::<VirtualMachineMigration>::all(client.clone()),
        watcher::Config::default(),
    )
    .run(migrate::reconcile, migrate::error_policy, ctx.clone())
    .for_each(|_| futures::future::ready(()));
    let images = Controller::new(
        Api::<crate::api::VirtualMachineImage>::all(client.clone()),
        watcher::Config::default(),
    )
    .run(images::reconcile, images::error_policy, ctx.clone())
    .for_each(|_| futures::future::ready(()));
    // A VM's change (its deletion above all) may release the volumes it named.
    let volumes = Controller::new(
        Api::<crate::api::VirtualMachineVolume>::all(client.clone()),
        watcher::Config::default(),
    )
    .watches_stream(vms_for_volumes, |vm: VirtualMachine| {
        let ns = vm.metadata.namespace.clone().unwrap_or_default();
        vm.spec
            .volumes()
            .map(|v| ObjectRef::new(v).within(&ns))
            .collect::<Vec<_>>()
    })
    .run(volumes::reconcile, volumes::error_policy, ctx.clone())
    .for_each(|_| futures::future::ready(()));
    // Services for VMs: their EndpointSlices.
    let services = services::run(ctx.clone(), vms_for_services);
    let orphans = vmpod::release_orphans(ctx.clone());
    tokio::join!(
        vm_watch, placement, migrations, images, volumes, services, orphans
    );
    Ok(())
}
