//! An in-process agent on a simulated hypervisor of its own: an instance of libvirt's
//! test driver (8 CPUs, 8 GiB), or vmlet's in-memory fake libvirt (4 CPUs, 8 GiB).
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;
use vmlet::agent::libvirt::{Connection, Fake, Shared};
use vmlet::api::VirtualMachine;

pub struct Node {
    pub name: String,
    pub lv: Shared,
    pub dir: tempfile::TempDir,
    image_root: PathBuf,
    /// The agent's arguments; change them before `start_agent` to run it differently.
    pub args: vmlet::agent::Args,
    agent: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

/// What a test node's agent runs on.
pub enum Backend {
    TestDriver,
    Fake,
}

impl Node {
    pub async fn new(prefix: &str) -> Self {
        Self::with_image_root(prefix, None).await
    }

    /// A node whose agent confines hostPath images to `root` (default: a temporary dir).
    pub async fn with_image_root(prefix: &str, root: Option<PathBuf>) -> Self {
        Self::build(prefix, root, |_| {}).await
    }

    /// A node whose agent runs with `customize` applied to its arguments.
    pub async fn build(
        prefix: &str,
        root: Option<PathBuf>,
        customize: impl FnOnce(&mut vmlet::agent::Args),
    ) -> Self {
        Self::build_on(Backend::TestDriver, prefix, root, customize).await
    }

    /// A node whose agent runs on vmlet's in-memory libvirt.
    pub async fn fake(prefix: &str) -> Self {
        Self::build_on(Backend::Fake, prefix, None, |_| {}).await
    }

    pub async fn build_on(
        backend: Backend,
        prefix: &str,
        root: Option<PathBuf>,
        customize: impl FnOnce(&mut vmlet::agent::Args),
    ) -> Self {
        vmlet::telemetry::init(Default::default());
        let name = format!(
            "{prefix}-{}",
            std::process::id() as u64 * 1000 + rand_u16() as u64
        );
        // test:///default is one shared instance per process; a node file gives each
        // simulated node a driver instance (and domains) of its own.
        let dir = tempfile::tempdir().unwrap();
        let node_xml = dir.path().join("node.xml");
        std::fs::write(
            &node_xml,
            "<node><cpu><mhz>2000</mhz><model>x86_64</model><nodes>1</nodes><sockets>1</sockets>\
             <cores>8</cores><threads>1</threads><active>8</active><total>8</total></cpu>\
             <memory>8388608</memory></node>",
        )
        .unwrap();
        let (uri, lv): (String, Shared) = match backend {
            Backend::TestDriver => {
                let uri = format!("test://{}", node_xml.display());
                let lv = Connection::open(&uri).await.expect("test driver");
                (uri, std::sync::Arc::new(lv))
            }
            Backend::Fake => {
                let uri = format!("fake:///{name}");
                (uri.clone(), std::sync::Arc::new(Fake::open(&uri)))
            }
        };
        let image_root = root.unwrap_or_else(|| dir.path().join("images"));
        std::fs::create_dir_all(&image_root).unwrap();
        let mut args = vmlet::agent::Args {
            node: name.clone(),
            libvirt_uri: uri,
            state_dir: dir.path().join("state"),
            image_root: image_root.clone(),
            accel: vmlet::agent::accel::AccelChoice::Tcg,
            reserved_memory: "0".into(),
            vm_overhead: "auto".into(),
            metrics_addr: "127.0.0.1:0".into(),
            advertise_address: None,
            migration_uri: None,
            migration_tls: true,
            orphan_grace_seconds: 2,
            lease_duration_seconds: 15,
            heartbeat_seconds: 5,
            fence_after_seconds: 60,
            kubeconfig: Some(super::kubeconfig_path()),
            peer_key_file: None,
            downloads: vmlet::agent::download::DownloadPolicy::allowing_loopback(),
            storage_pools: vec![],
            stream_tls_dir: None,
            stream_addr: "127.0.0.1:0".into(),
        };
        customize(&mut args);
        let mut n = Node {
            name,
            lv,
            dir,
            image_root,
            args,
            agent: None,
        };
        n.start_agent();
        n
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn image_root(&self) -> PathBuf {
        self.image_root.clone()
    }

    pub fn start_agent(&mut self) {
        let args = self.args.clone();
        let lv = self.lv.clone();
        self.agent = Some(tokio::spawn(vmlet::agent::run_with(
            args,
            lv,
            std::future::pending(),
        )));
    }

    /// Removes the node's Hypervisor and Lease (the agent is stopped first).
    /// Registers a Kubernetes Node of this name, labelled as a hypervisor plus `labels`.
    pub async fn register(&self, labels: &[(&str, &str)]) {
        let client = super::client().await;
        let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client);
        let mut l: std::collections::BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        l.insert("vmlet.dev/hypervisor".into(), "true".into());
        l.insert("kubernetes.io/hostname".into(), self.name.clone());
        let node = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": self.name, "labels": l}});
        nodes
            .patch(
                &self.name,
                &PatchParams::apply("vmlet-tests").force(),
                &Patch::Apply(&node),
            )
            .await
            .unwrap();
    }

    pub async fn forget(mut self) {
        self.crash_agent();
        let client = super::client().await;
        let hvs: Api<vmlet::api::Hypervisor> = Api::all(client.clone());
        let _ = hvs.delete(&self.name, &DeleteParams::default()).await;
        let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
            Api::namespaced(client, "kube-node-lease");
        let _ = leases
            .delete(&format!("vmlet-{}", self.name), &DeleteParams::default())
            .await;
        let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(super::client().await);
        let _ = nodes.delete(&self.name, &DeleteParams::default()).await;
    }

    pub fn crash_agent(&mut self) {
        if let Some(h) = self.agent.take() {
            h.abort();
        }
    }

    pub async fn domains_for(&self, uid: &str) -> usize {
        self.lv
            .list()
            .await
            .unwrap()
            .iter()
            .filter(|d| d.uuid == uid)
            .count()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.crash_agent();
    }
}

pub fn rand_u16() -> u16 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    (t.subsec_nanos() % 65536) as u16
}

pub async fn bind(api: &Api<VirtualMachine>, name: &str, node: &str) {
    let patch = json!({"apiVersion": "vmlet.dev/v1alpha1", "kind": "VirtualMachine", "status": {"nodeName": node}});
    api.patch_status(
        name,
        &PatchParams::apply("vmlet-test-scheduler"),
        &Patch::Apply(&patch),
    )
    .await
    .unwrap();
}

/// A label no node carries: a VM that selects it is placed by nobody but its test, so no
/// controller running beside the tests (another test's, or `make demo`'s) binds it first.
pub const TEST_ONLY_SELECTOR: (&str, &str) = ("vmlet.dev/bound-by-test", "true");

/// Creates the VM and binds it to `node` as a scheduler would; unless `spec` selects
/// nodes itself, it selects none, so that only this binding places it.
pub async fn create_vm(
    api: &Api<VirtualMachine>,
    name: &str,
    mut spec: serde_json::Value,
    node: &str,
) -> String {
    if spec.get("nodeSelector").is_none() {
        spec["nodeSelector"] = json!({TEST_ONLY_SELECTOR.0: TEST_ONLY_SELECTOR.1});
    }
    let vm = VirtualMachine::new(name, serde_json::from_value(spec).unwrap());
    let vm = api.create(&PostParams::default(), &vm).await.unwrap();
    bind(api, name, node).await;
    vm.metadata.uid.unwrap()
}

pub async fn wait_phase(
    api: &Api<VirtualMachine>,
    name: &str,
    phase: &str,
    secs: u64,
) -> VirtualMachine {
    let got = super::wait_for(Duration::from_secs(secs), || async {
        let vm = api.get(name).await.ok()?;
        let p = serde_json::to_value(vm.status.as_ref()?.phase?).ok()?;
        (p == phase).then_some(vm)
    })
    .await;
    match got {
        Some(vm) => vm,
        None => panic!(
            "{name} never reached {phase}: {:#?}",
            api.get(name).await.ok().and_then(|v| v.status)
        ),
    }
}

pub fn condition(
    vm: &VirtualMachine,
    t: vmlet::api::conditions::Type,
) -> &k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    vmlet::api::conditions::find(&vm.status.as_ref().unwrap().conditions, t)
        .unwrap_or_else(|| panic!("no {t} condition"))
}

pub async fn patch_spec(api: &Api<VirtualMachine>, name: &str, spec: serde_json::Value) {
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": spec})),
    )
    .await
    .unwrap();
}
