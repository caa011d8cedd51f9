//! The node agent: turns the VirtualMachines bound to its node into libvirt domains and
//! reports their state, and the node's, back to the API.

pub mod accel;
pub mod disks;
pub mod domain;
pub mod download;
pub mod image_report;
pub mod images;
pub mod layout;
pub mod libvirt;
mod metrics;
pub mod migration;
pub mod node;
pub mod overhead;
pub mod peers;
pub mod plan;
pub mod probes;
mod publish;
mod reconcile;
pub mod render;
mod report;
pub mod seed;
mod status;
mod storage;
mod streams;
pub mod tools;
pub mod volumes;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::runtime::controller::Controller;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};

use crate::api::{VirtualMachine, VirtualMachineClass};

/// The field manager of everything the agent writes.
pub const FIELD_MANAGER: &str = "vmlet-agent";

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// This node's name: the agent manages VMs whose status.nodeName equals it.
    #[arg(long, env = "NODE_NAME")]
    pub node: String,
    /// libvirt connection URI, e.g. qemu:///system or test:///default.
    #[arg(long, env = "LIBVIRT_URI", default_value = "qemu:///system")]
    pub libvirt_uri: String,
    /// Overlays, blank disks, seed ISOs, console logs and the image cache live here.
    #[arg(long, env = "VMLET_STATE_DIR", default_value = "/var/lib/vmlet")]
    pub state_dir: PathBuf,
    /// hostPath images must resolve inside this directory.
    #[arg(
        long,
        env = "VMLET_IMAGE_ROOT",
        default_value = "/var/lib/vmlet/images"
    )]
    pub image_root: PathBuf,
    /// Acceleration: auto probes KVM and falls back to TCG.
    #[arg(long, value_enum, default_value = "auto")]
    pub accel: accel::AccelChoice,
    /// Host memory kept back from guests, e.g. 1Gi.
    #[arg(long, default_value = "512Mi")]
    pub reserved_memory: String,
    /// Host memory each VM costs beyond its guest memory, reserved by the scheduler:
    /// FIXED,PER_VCPU,PER_GIB (e.g. 200Mi,8Mi,8Mi), or auto for the figures measured for
    /// this node's accelerator.
    #[arg(long, default_value = "auto")]
    pub vm_overhead: String,
    /// Address of /metrics, /healthz and /console.
    #[arg(long, default_value = "127.0.0.1:9464")]
    pub metrics_addr: String,
    /// The address others reach this agent at (the Pod's IP); defaults to the address
    /// /metrics binds when that is a specific one.
    #[arg(long, env = "POD_IP")]
    pub advertise_address: Option<String>,
    /// The libvirt URI other nodes' libvirt uses to reach this node's for live migration,
    /// e.g. qemu+tcp://10.0.0.5/system. Its host also carries the migration data. Unset:
    /// VMs cannot migrate to this node.
    #[arg(long, env = "VMLET_MIGRATION_URI")]
    pub migration_uri: Option<String>,
    /// Live migrations this node sends go over TLS (VIR_MIGRATE_TLS): guest memory and
    /// disks are encrypted in flight. Needs QEMU's migration PKI on both nodes
    /// (qemu.conf `migrate_tls_x509_cert_dir`); `--migration-tls=false` sends them in clear.
    #[arg(long, env = "VMLET_MIGRATION_TLS", default_value_t = true, action = clap::ArgAction::Set)]
    pub migration_tls: bool,
    /// Seconds a domain with vmlet metadata but no VM is kept before it is removed.
    #[arg(long, default_value = "30")]
    pub orphan_grace_seconds: u64,
    /// Duration of the heartbeat Lease, in seconds.
    #[arg(long, default_value = "15")]
    pub lease_duration_seconds: u64,
    /// Seconds between heartbeat renewals.
    #[arg(long, default_value = "5")]
    pub heartbeat_seconds: u64,
    /// Self-fencing: after this many seconds without a successful renewal the agent
    /// destroys its domains (it may be cut off, and the controller will restart them
    /// elsewhere). Longer than API server outages you want VMs to ride out. 0 disables
    /// fencing.
    #[arg(long, default_value = "60")]
    pub fence_after_seconds: u64,
    /// A file holding the key all agents of the cluster share to authenticate their
    /// answers to "do you reach the API server?" (asked before fencing; docs/reliability.md).
    /// Unset: the agent fences without asking.
    #[arg(long, env = "VMLET_PEER_KEY_FILE")]
    pub peer_key_file: Option<PathBuf>,
    /// What image downloads may reach and take.
    #[command(flatten)]
    pub downloads: download::DownloadPolicy,
    /// A shared storage pool, NAME=PATH: a directory every node mounts (NFS, CephFS)
    /// where volumes with `storage: NAME` live. Repeat for more pools.
    #[arg(
        long = "storage-pool",
        env = "VMLET_STORAGE_POOLS",
        value_delimiter = ','
    )]
    pub storage_pools: Vec<String>,
    /// Kubeconfig to use instead of in-cluster config or $KUBECONFIG.
    #[arg(long, env = "VMLET_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// A directory with `ca.crt`, `tls.crt`, `tls.key`: this agent's certificate for
    /// console and display streams, and the CA of the API component's client certificate.
    /// Unset: no streams (`kubectl vm console` cannot reach this node's VMs).
    #[arg(long, env = "VMLET_STREAM_TLS_DIR")]
    pub stream_tls_dir: Option<PathBuf>,
    /// Where the stream listener binds.
    #[arg(long, default_value = "0.0.0.0:8444")]
    pub stream_addr: String,
}

impl Context {
    /// Remembers a VM as a write returned it.
    pub fn wrote(&self, vm: VirtualMachine) {
        if let Some(uid) = vm.metadata.uid.clone() {
            self.newest
                .lock()
                .expect("not poisoned")
                .insert(uid, Arc::new(vm));
        }
    }

    /// The cached VM, or the copy our last write returned when the cache has not caught
    /// up with it yet (resource versions compare as integers since Kubernetes 1.35).
    pub fn freshest(&self, cached: Arc<VirtualMachine>) -> Arc<VirtualMachine> {
        let Some(uid) = cached.metadata.uid.as_deref() else {
            return cached;
        };
        let rv = |vm: &VirtualMachine| {
            vm.metadata
                .resource_version
                .as_deref()
                .and_then(|v| v.parse::<u64>().ok())
        };
        let mut newest = self.newest.lock().expect("not poisoned");
        match newest.get(uid) {
            Some(mine) if rv(mine).zip(rv(&cached)).is_some_and(|(m, c)| m > c) => mine.clone(),
            Some(_) => {
                newest.remove(uid);
                cached
            }
            None => cached,
        }
    }
}

pub struct Context {
    pub client: Client,
    pub node: String,
    pub lv: libvirt::Shared,
    pub images: images::ImageCache,
    pub facts: node::NodeFacts,
    /// Why `facts.accel` was chosen (the KVM probe's verdict or the flag).
    pub accel_reason: String,
    /// What each VM costs the host beyond guest memory, and where the figures come from.
    pub overhead: (crate::api::overhead::Overhead, String),
    pub recorder: Recorder,
    pub vms: kube::runtime::reflector::Store<VirtualMachine>,
    pub classes: kube::runtime::reflector::Store<VirtualMachineClass>,
    /// The newest copy of each VM this agent has written (a write's response), for the
    /// moment the cache still shows an older one: acting on that would repeat the write.
    pub newest: std::sync::Mutex<std::collections::HashMap<String, Arc<VirtualMachine>>>,
    /// Live migrations this node is sending now.
    pub migrations: migration::InFlight,
    /// Never held across an await: a reconcile takes its VM's entry out and puts it back.
    pub runtime: std::sync::Mutex<std::collections::HashMap<String, plan::VmRuntime>>,
    /// Reconciles that may start a domain hold it shared; fencing holds it exclusively, so
    /// no start slips in between fencing's flag and its destroys.
    pub fence_gate: tokio::sync::RwLock<()>,
    /// Set while the agent has fenced itself: no domain is started until a renewal works.
    pub fenced: std::sync::atomic::AtomicBool,
    pub metrics: metrics::Metrics,
    pub args: Args,
    /// Where peers reach this agent.
    pub agent_url: Option<String>,
    /// Where the API component opens streams here (host:port).
    pub stream_address: Option<String>,
    /// The peers' shared key (see `peers`).
    pub peer_key: Option<Vec<u8>>,
    /// Every Hypervisor: the peers to ask before fencing, and how many there are.
    pub hypervisors: kube::runtime::reflector::Store<crate::api::Hypervisor>,
    /// When the Lease was last renewed: peers ask whether this agent reaches the API.
    pub last_renewal: std::sync::Mutex<std::time::Instant>,
    pub http: reqwest::Client,
    /// The uid of this node's Node object, once read: the owner of its Hypervisor and
    /// Lease.
    pub node_uid: std::sync::Mutex<Option<String>>,
    /// The storage pools (`--storage-pool`), by name.
    pub pools: std::collections::BTreeMap<String, std::path::PathBuf>,
    /// VMs whose volumes a snapshot or a restore is copying: not started meanwhile.
    pub storage_busy: std::sync::Mutex<std::collections::HashSet<String>>,
    /// The readiness probes of running VMs.
    pub probes: probes::Probers,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let lv = libvirt::Connection::open(&args.libvirt_uri).await?;
    // Once per process: tests and benchmarks run several agents in one.
    tokio::spawn(crate::memory::trim_loop());
    run_with(args, Arc::new(lv), crate::shutdown::signal()).await
}

/// Runs the agent on an open libvirt connection until `shutdown` completes. Dropping the
/// returned future stops everything the agent runs (tests use that as a crash).
pub async fn run_with(
    args: Args,
    lv: libvirt::Shared,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) -> anyhow::Result<()> {
    let client = crate::kubeconfig::client(args.kubeconfig.as_ref()).await?;
    std::fs::create_dir_all(&args.state_dir)?;
    let listener = tokio::net::TcpListener::bind(&args.metrics_addr).await?;
    let agent_url = agent_url(args.advertise_address.as_deref(), listener.local_addr()?)?;
    let streams = stream_listener(&args).await?;
    let (facts, why) = node_facts(&args, lv.as_ref()).await?;
    tracing::info!(node = %args.node, uri = %args.libvirt_uri, accel = facts.accel.as_str(), accel_reason = %why, "agent starting");

    // Only the VMs bound to this node are watched (and cached).
    let vm_api: Api<VirtualMachine> = Api::all(client.clone());
    let wc = watcher::Config::default().fields(&format!("status.nodeName={}", args.node));
    let (vms, vm_writer) = kube::runtime::reflector::store::<VirtualMachine>();
    let vm_stream = kube::runtime::reflector(vm_writer, crate::watch::slim(watcher(vm_api, wc)))
        .default_backoff()
        .touched_objects();
    let controller = Controller::for_stream(vm_stream, vms.clone());
    let (classes, class_stream) = watch_classes(client.clone());

    let peer_key = read_peer_key(args.peer_key_file.as_deref())?;
    // The peers to ask before fencing: watched only when there is a key to ask with.
    let (hypervisors, hv_writer) = kube::runtime::reflector::store::<crate::api::Hypervisor>();
    let hv_stream = watch_peers(client.clone(), hv_writer, peer_key.is_some());
    let pools = volumes::parse_pools(&args.storage_pools).map_err(|e| anyhow::anyhow!(e))?;
    let ctx = Arc::new(Context {
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: "vmlet-agent".into(),
                instance: Some(args.node.clone()),
            },
        ),
        images: images::ImageCache::new(
            &args.state_dir,
            args.image_root.clone(),
            args.downloads.clone(),
        )
        .with_storage(&args.node, pools.clone()),
        client,
        node: args.node.clone(),
        lv: lv.clone(),
        overhead: overhead::choose(&args.vm_overhead, facts.accel)?,
        facts,
        accel_reason: why,
        vms: vms.clone(),
        classes: classes.clone(),
        runtime: Default::default(),
        fence_gate: Default::default(),
        newest: Default::default(),
        migrations: Default::default(),
        fenced: Default::default(),
        metrics: metrics::Metrics::default(),
        args: args.clone(),
        agent_url,
        stream_address: streams.as_ref().and_then(|s| s.2.clone()),
        peer_key,
        hypervisors,
        last_renewal: std::sync::Mutex::new(std::time::Instant::now()),
        node_uid: Default::default(),
        pools,
        storage_busy: Default::default(),
        probes: Default::default(),
        http: reqwest::Client::builder()
            .timeout(peers::PEER_TIMEOUT)
            .build()?,
    });

    // libvirt's lifecycle events, a probe verdict that changes, a class that changes
    // (every VM that uses it).
    let controller = controller
        .reconcile_on(lifecycle_triggers(lv.lifecycle_events(), vms.clone()))
        .reconcile_on(lifecycle_triggers(ctx.probes.changes(), vms.clone()))
        .reconcile_on(class_triggers(class_stream, vms.clone()))
        .graceful_shutdown_on(shutdown)
        .run(reconcile::reconcile, reconcile::error_policy, ctx.clone())
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %e, "reconcile failed");
            }
        });
    let storage = storage_controllers(ctx.clone());
    // Not spawned: when this future is dropped, the loops stop with it.
    tokio::select! {
        _ = controller => {},
        _ = migration_controller(ctx.clone()) => {},
        _ = storage => {},
        _ = report::hypervisor_loop(ctx.clone()) => {},
        _ = report::heartbeat_loop(ctx.clone()) => {},
        _ = reconcile::orphan_loop(ctx.clone()) => {},
        _ = metrics::serve(listener, ctx.clone()) => {},
        _ = serve_streams(streams, ctx.clone()) => {},
        _ = hv_stream => {},
        _ = lv.keep_connected() => {},
    }
    tracing::info!("agent stopped");
    Ok(())
}

/// The listener for consoles and displays, its TLS configuration and the address to
/// advertise: only when the agent was given its stream certificate.
async fn stream_listener(args: &Args) -> anyhow::Result<Option<StreamListener>> {
    let Some(dir) = &args.stream_tls_dir else {
        return Ok(None);
    };
    let b = crate::tls::Bundle::load(dir)?;
    let tls = crate::tls::server(b.cert, b.key, b.ca, false)?;
    let l = tokio::net::TcpListener::bind(&args.stream_addr).await?;
    let addr = agent_url(args.advertise_address.as_deref(), l.local_addr()?)?
        .map(|u| u.trim_start_matches("http://").to_string());
    Ok(Some((l, Arc::new(tls), addr)))
}

async fn serve_streams(streams: Option<StreamListener>, ctx: Arc<Context>) {
    match streams {
        Some((l, tls, _)) => streams::serve(l, tls, ctx).await,
        None => std::future::pending().await,
    }
}

/// Every VirtualMachineClass, cached: VMs take their hardware from them.
fn watch_classes(
    client: kube::Client,
) -> (
    kube::runtime::reflector::Store<VirtualMachineClass>,
    impl futures::Stream<Item = Result<watcher::Event<VirtualMachineClass>, watcher::Error>>,
) {
    let (classes, class_writer) = kube::runtime::reflector::store::<VirtualMachineClass>();
    let class_stream = kube::runtime::reflector(
        class_writer,
        watcher(
            Api::<VirtualMachineClass>::all(client),
            watcher::Config::default(),
        ),
    );
    (classes, class_stream)
}

type StreamListener = (
    tokio::net::TcpListener,
    Arc<rustls::ServerConfig>,
    Option<String>,
);

/// Both sides of live migrations: the source copies, the target receives.
async fn migration_controller(ctx: Arc<Context>) {
    Controller::new(
        Api::<crate::api::VirtualMachineMigration>::all(ctx.client.clone()),
        watcher::Config::default(),
    )
    .run(migration::reconcile, migration::error_policy, ctx)
    .for_each(|_| futures::future::ready(()))
    .await
}

/// Volumes (growth, deletion), snapshots and restores, each acted on by the agent that
/// holds the data.
async fn storage_controllers(ctx: Arc<Context>) {
    let volumes = Controller::new(
        Api::<crate::api::VirtualMachineVolume>::all(ctx.client.clone()),
        watcher::Config::default(),
    )
    .run(storage::volume, storage::error_policy, ctx.clone())
    .for_each(|_| futures::future::ready(()));
    let snapshots = Controller::new(
        Api::<crate::api::VirtualMachineSnapshot>::all(ctx.client.clone()),
        watcher::Config::default(),
    )
    .run(storage::snapshot, storage::error_policy, ctx.clone())
    .for_each(|_| futures::future::ready(()));
    let restores = Controller::new(
        Api::<crate::api::VirtualMachineRestore>::all(ctx.client.clone()),
        watcher::Config::default(),
    )
    .run(storage::restore, storage::error_policy, ctx.clone())
    .for_each(|_| futures::future::ready(()));
    tokio::join!(volumes, snapshots, restores, published_images(ctx.clone()));
}

/// Images published from a volume or snapshot: looked at again when their source changes
/// (a snapshot becomes ready, a volume is let go by its VM).
async fn published_images(ctx: Arc<Context>) {
    use crate::api::{VirtualMachineImage, VirtualMachineSnapshot, VirtualMachineVolume};
    use kube::runtime::reflector::{ObjectRef, Store};
    fn naming(
        store: &Store<VirtualMachineImage>,
        ns: Option<String>,
        named: impl Fn(&VirtualMachineImage) -> bool,
    ) -> Vec<ObjectRef<VirtualMachineImage>> {
        store
            .state()
            .iter()
            .filter(|i| i.metadata.namespace == ns && named(i))
            .map(|i| ObjectRef::from(&**i))
            .collect()
    }
    let images = Controller::new(
        Api::<VirtualMachineImage>::all(ctx.client.clone()),
        watcher::Config::default(),
    );
    let (by_snapshot, by_volume) = (images.store(), images.store());
    images
        .watches(
            Api::<VirtualMachineSnapshot>::all(ctx.client.clone()),
            watcher::Config::default(),
            move |s: VirtualMachineSnapshot| {
                let name = s.metadata.name.clone().unwrap_or_default();
                naming(&by_snapshot, s.metadata.namespace, |i| {
                    i.spec
                        .source
                        .snapshot
                        .as_ref()
                        .is_some_and(|r| r.name == name)
                })
            },
        )
        .watches(
            Api::<VirtualMachineVolume>::all(ctx.client.clone()),
            watcher::Config::default(),
            move |v: VirtualMachineVolume| {
                let name = v.metadata.name.clone().unwrap_or_default();
                naming(&by_volume, v.metadata.namespace, |i| {
                    i.spec
                        .source
                        .volume
                        .as_ref()
                        .is_some_and(|r| r.name == name)
                })
            },
        )
        .run(publish::reconcile, storage::error_policy, ctx)
        .for_each(|_| futures::future::ready(()))
        .await
}

/// Keeps the Hypervisor store (the peers to ask before fencing) filled, when `enabled`
/// (there is a key to ask with); else never returns and watches nothing.
async fn watch_peers(
    client: Client,
    writer: kube::runtime::reflector::store::Writer<crate::api::Hypervisor>,
    enabled: bool,
) {
    if !enabled {
        return std::future::pending().await;
    }
    kube::runtime::reflector(
        writer,
        watcher(
            Api::<crate::api::Hypervisor>::all(client),
            watcher::Config::default(),
        ),
    )
    .default_backoff()
    .for_each(|_| futures::future::ready(()))
    .await
}

/// The VM of each uid `uids` names (libvirt lifecycle events: a crash, a `virsh
/// destroy`, a guest poweroff; probe verdicts), as a reconcile trigger.
fn lifecycle_triggers(
    uids: tokio::sync::broadcast::Receiver<String>,
    vms: kube::runtime::reflector::Store<VirtualMachine>,
) -> impl futures::Stream<Item = ObjectRef<VirtualMachine>> + use<> {
    tokio_stream_from(uids).filter_map(move |uuid| {
        let found = vms
            .state()
            .into_iter()
            .find(|vm| vm.metadata.uid.as_deref() == Some(uuid.as_str()));
        futures::future::ready(found.map(|vm| ObjectRef::from(&*vm)))
    })
}

/// Where `kubectl vm console` and the peers reach this agent: the advertised address
/// (POD_IP) at the port bound, or the address bound when it is a specific one.
fn agent_url(
    advertise: Option<&str>,
    bound: std::net::SocketAddr,
) -> anyhow::Result<Option<String>> {
    Ok(match (advertise, bound.ip().is_unspecified()) {
        (Some(ip), _) => Some(format!(
            "http://{}",
            std::net::SocketAddr::new(ip.parse()?, bound.port())
        )),
        (None, false) => Some(format!("http://{bound}")),
        (None, true) => None,
    })
}

/// What this node offers guests, as libvirt says: acceleration (and why) and UEFI.
async fn node_facts(
    args: &Args,
    lv: &dyn libvirt::Libvirt,
) -> anyhow::Result<(node::NodeFacts, String)> {
    let offered = lv.domain_types().await?;
    let (accel, why) = accel::detect(args.accel, lv, &args.state_dir).await;
    let domain_type = node::domain_type(&offered, accel);
    let uefi = lv.uefi(&domain_type).await.unwrap_or_else(|e| {
        tracing::warn!(error = %e, "cannot read libvirt's domain capabilities: reporting no UEFI");
        false
    });
    let facts = node::NodeFacts {
        node: args.node.clone(),
        state_dir: args.state_dir.clone(),
        accel,
        uefi,
        domain_type,
    };
    Ok((facts, why))
}

/// The peers' shared key, when the agent has one: at least 16 bytes.
fn read_peer_key(file: Option<&std::path::Path>) -> anyhow::Result<Option<Vec<u8>>> {
    let Some(f) = file else {
        return Ok(None);
    };
    let key =
        std::fs::read(f).map_err(|e| anyhow::anyhow!("--peer-key-file {}: {e}", f.display()))?;
    anyhow::ensure!(
        key.len() >= 16,
        "--peer-key-file {}: key shorter than 16 bytes",
        f.display()
    );
    Ok(Some(key))
}

/// The VMs that name a class, each time that class changes.
fn class_triggers(
    classes: impl futures::Stream<Item = Result<watcher::Event<VirtualMachineClass>, watcher::Error>>,
    vms: kube::runtime::reflector::Store<VirtualMachine>,
) -> impl futures::Stream<Item = ObjectRef<VirtualMachine>> {
    classes
        .filter_map(|ev| futures::future::ready(ev.ok()))
        .flat_map(move |ev| {
            let names: Vec<String> = match ev {
                watcher::Event::Apply(c) | watcher::Event::Delete(c) => {
                    c.metadata.name.into_iter().collect()
                }
                _ => Vec::new(),
            };
            let refs: Vec<_> = vms
                .state()
                .into_iter()
                .filter(|vm| {
                    vm.spec
                        .class_ref
                        .as_ref()
                        .is_some_and(|r| names.contains(&r.name))
                })
                .map(|vm| ObjectRef::from(&*vm))
                .collect();
            futures::stream::iter(refs)
        })
}

/// A broadcast receiver as a stream; events a slow reader missed are skipped (the
/// periodic requeue covers them).
fn tokio_stream_from<T: Clone + Send + 'static>(
    rx: tokio::sync::broadcast::Receiver<T>,
) -> impl futures::Stream<Item = T> {
    futures::stream::unfold(rx, |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(v) => return Some((v, rx)),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    })
}

pub(crate) const REQUEUE: Duration = Duration::from_secs(300);
