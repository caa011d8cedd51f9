//! Shared set-up for tests against the real local control plane.
#![allow(dead_code)]

pub mod node;
pub mod proxy;

use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::{Client, Config, config::KubeConfigOptions, config::Kubeconfig};
use tokio::sync::OnceCell;

/// The kubeconfig `hack/cluster.sh up` writes, unless KUBECONFIG names another.
pub fn kubeconfig_path() -> std::path::PathBuf {
    match std::env::var_os("KUBECONFIG") {
        Some(p) => p.into(),
        None => std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/cluster/kubeconfig"),
    }
}

pub async fn client() -> Client {
    let path = kubeconfig_path();
    let kc = Kubeconfig::read_from(&path).unwrap_or_else(|e| {
        panic!(
            "no control plane: cannot read {} ({e}); run `hack/cluster.sh up` or `make test`",
            path.display()
        )
    });
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("kubeconfig");
    Client::try_from(config).expect("client")
}

static CRDS: OnceCell<()> = OnceCell::const_new();

/// Installs the CRDs (server-side apply) and waits until each is Established.
pub async fn ensure_crds(client: &Client) {
    CRDS.get_or_init(|| async {
        let api: Api<CustomResourceDefinition> = Api::all(client.clone());
        let pp = PatchParams::apply("vmlet-tests").force();
        for (_, crd) in vmlet::api::crds() {
            let name = crd.metadata.name.clone().unwrap();
            api.patch(&name, &pp, &Patch::Apply(&crd))
                .await
                .expect("apply CRD");
        }
        for (_, crd) in vmlet::api::crds() {
            let name = crd.metadata.name.clone().unwrap();
            wait_for(Duration::from_secs(30), || {
                let api = api.clone();
                let name = name.clone();
                async move {
                    let crd = api.get(&name).await.ok()?;
                    let conds = crd.status?.conditions?;
                    conds
                        .iter()
                        .any(|c| c.type_ == "Established" && c.status == "True")
                        .then_some(())
                }
            })
            .await
            .unwrap_or_else(|| panic!("CRD {name} not Established"));
        }
    })
    .await;
}

/// A fresh namespace for one test, deleted by the returned guard's `cleanup`.
pub async fn namespace(client: &Client, prefix: &str) -> String {
    let api: Api<Namespace> = Api::all(client.clone());
    let mut ns = Namespace::default();
    ns.metadata.generate_name = Some(format!("{prefix}-"));
    let ns = api
        .create(&PostParams::default(), &ns)
        .await
        .expect("namespace");
    ns.metadata.name.unwrap()
}

/// Deletes the namespace's VMs and waits until their finalizers are done (the agent
/// must still run), then the namespace itself.
pub async fn delete_vms_and_namespace(client: &Client, name: &str) {
    let api: Api<vmlet::api::VirtualMachine> = Api::namespaced(client.clone(), name);
    let _ = api
        .delete_collection(&DeleteParams::default(), &Default::default())
        .await;
    let gone = wait_for(Duration::from_secs(60), || async {
        api.list(&Default::default())
            .await
            .ok()?
            .items
            .is_empty()
            .then_some(())
    })
    .await;
    assert!(
        gone.is_some(),
        "VMs in {name} were not removed by their agent"
    );
    delete_namespace(client, name).await;
}

pub async fn delete_namespace(client: &Client, name: &str) {
    let api: Api<Namespace> = Api::all(client.clone());
    let _ = api.delete(name, &DeleteParams::default()).await;
}

/// Polls `f` every 100 ms until it returns Some or `timeout` passes.
pub async fn wait_for<T, F, Fut>(timeout: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The multi-document YAML files under `examples/`, parsed.
pub fn example_documents() -> Vec<(String, serde_json::Value)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("examples/")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    let mut docs = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        let values: Vec<serde_json::Value> = serde_saphyr::from_multiple(&text).unwrap();
        for v in values {
            if !v.is_null() {
                docs.push((f.file_name().unwrap().to_string_lossy().into_owned(), v));
            }
        }
    }
    docs
}

/// Controller arguments for an in-process replica: defaults, metrics on any free port,
/// the leader Lease in `lease_namespace`.
pub fn controller_args(identity: &str, lease_namespace: &str) -> vmlet::controller::Args {
    vmlet::controller::Args {
        metrics_addr: "127.0.0.1:0".into(),
        lease_namespace: lease_namespace.into(),
        identity: Some(identity.into()),
        kubeconfig: Some(kubeconfig_path()),
        ..Default::default()
    }
}

/// Serves `body` over HTTP on 127.0.0.1 (any path) for as long as the test runs; returns
/// the URL ending in `name`.
pub async fn serve_bytes(body: Vec<u8>, name: &str) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let body = vmlet::http::Bytes::from(body);
    tokio::spawn(vmlet::http::serve(listener, move |_| {
        let body = body.clone();
        async move { Some(("application/octet-stream", body)) }
    }));
    format!("http://{addr}/{name}")
}

/// Serves a file; returns its URL and sha256.
pub async fn serve_file(path: &std::path::Path) -> (String, String) {
    use sha2::Digest;
    let bytes = std::fs::read(path).unwrap();
    let sha = hex::encode(sha2::Sha256::digest(&bytes));
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    (serve_bytes(bytes, &name).await, sha)
}

/// `virsh -c qemu:///system ARGS`.
pub fn virsh(args: &[&str]) -> std::process::Output {
    std::process::Command::new("virsh")
        .arg("-c")
        .arg("qemu:///system")
        .args(args)
        .output()
        .expect("virsh")
}

/// Removes the named domains from the shared libvirtd even when the test fails.
pub struct DomainGuard(pub Vec<String>);

impl Drop for DomainGuard {
    fn drop(&mut self) {
        for d in &self.0 {
            let _ = virsh(&["destroy", d]);
            let _ = virsh(&["undefine", d]);
        }
    }
}

/// The tiny guest (hack/tiny-guest.sh, built once into .cache/guest) served over HTTP as
/// the sha256-checked VirtualMachineImages tiny-kernel and tiny-initrd in `ns`.
pub async fn tiny_guest_images(client: &Client, ns: &str) {
    static BUILT: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/guest");
    {
        let _once = BUILT.lock().unwrap_or_else(|e| e.into_inner());
        let status = std::process::Command::new(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("hack/tiny-guest.sh"),
        )
        .arg(&out)
        .status()
        .expect("hack/tiny-guest.sh");
        assert!(status.success(), "building the tiny guest failed");
    }
    let images: Api<vmlet::api::VirtualMachineImage> = Api::namespaced(client.clone(), ns);
    for (name, fmt, file) in [
        ("tiny-kernel", "kernel", "vmlinuz"),
        ("tiny-initrd", "initrd", "initrd.gz"),
    ] {
        let (url, sha) = serve_file(&out.join(file)).await;
        let spec =
            serde_json::json!({"format": fmt, "source": {"http": {"url": url, "sha256": sha}}});
        let img = vmlet::api::VirtualMachineImage::new(name, serde_json::from_value(spec).unwrap());
        images.create(&PostParams::default(), &img).await.unwrap();
    }
}

/// The pid of the kube-apiserver hack/cluster.sh started.
pub fn apiserver_pid() -> String {
    let pid_file = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(".cache/cluster/run/kube-apiserver.pid");
    std::fs::read_to_string(&pid_file)
        .expect("kube-apiserver started by hack/cluster.sh")
        .trim()
        .to_string()
}

/// `kill SIG PID`, asserted.
pub fn signal(sig: &str, pid: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, pid])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} {pid}");
}

/// Removes what an agent of node `name` registered: its Node, Hypervisor and Lease.
pub async fn forget_node(client: &Client, name: &str) {
    let dp = DeleteParams::default();
    let _ = Api::<k8s_openapi::api::core::v1::Node>::all(client.clone())
        .delete(name, &dp)
        .await;
    let _ = Api::<vmlet::api::Hypervisor>::all(client.clone())
        .delete(name, &dp)
        .await;
    let _ = Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(
        client.clone(),
        "kube-node-lease",
    )
    .delete(&format!("vmlet-{name}"), &dp)
    .await;
}

/// A temporary directory for an agent's state where real QEMU runs: traversable (0711)
/// like /var/lib, since QEMU runs as its own user and must reach the files libvirt hands
/// it. (tempfile makes directories 0700.)
pub fn qemu_tempdir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    dir
}

/// Creates (or updates) Node `name` with `labels` and, as kubelet would, `ip` as its
/// InternalIP: the address an agent on it may publish (see `endpoint_on_node`).
pub async fn node_with_address(client: &Client, name: &str, labels: serde_json::Value, ip: &str) {
    use kube::api::{Patch, PatchParams};
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    let n = serde_json::json!({"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": labels}});
    nodes
        .patch(name, &PatchParams::apply("vmlet-test"), &Patch::Apply(&n))
        .await
        .unwrap();
    let st = serde_json::json!({"status": {"addresses": [{"type": "InternalIP", "address": ip}]}});
    nodes
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&st))
        .await
        .unwrap();
}

/// Runs `qemu-img` with `args` and asserts it succeeded.
pub fn qemu_img<I, S>(args: I)
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let out = std::process::Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img (hack/deps.sh)");
    assert!(
        out.status.success(),
        "qemu-img: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A command-line tool of the pinned set (kubectl, helm: .cache/bin, which hack/cluster.sh
/// fills) or of the machine, run against the test cluster; `stdin` is written to it.
pub fn cli(cmd: &str, args: &[&str], stdin: Option<&str>) -> std::process::Output {
    let local = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(".cache/bin")
        .join(cmd);
    let program = if local.exists() {
        local
    } else {
        std::path::PathBuf::from(cmd)
    };
    let mut c = std::process::Command::new(&program);
    c.args(args)
        .env("KUBECONFIG", kubeconfig_path())
        .stdin(if stdin.is_some() {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        })
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = c
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd}: {e} (run hack/cluster.sh build)"));
    if let Some(input) = stdin {
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    child.wait_with_output().unwrap()
}

/// Its stdout, or a panic that shows both streams.
pub fn cli_ok(out: std::process::Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// QEMU's pid for the running libvirt domain `name`, from libvirt's pid file.
pub fn qemu_pid(name: &str) -> Option<u32> {
    std::fs::read_to_string(format!("/run/libvirt/qemu/{name}.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Waits until `api` lists nothing; false when `timeout` passes first.
pub async fn wait_until_empty<K>(api: &Api<K>, timeout: Duration) -> bool
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    wait_for(timeout, || async {
        api.list(&Default::default())
            .await
            .ok()?
            .items
            .is_empty()
            .then_some(())
    })
    .await
    .is_some()
}

/// An agent's arguments for a test node `node` on libvirt `uri`, with its state and
/// image root under `base`; tests change what they need (struct update syntax).
pub fn agent_args(node: &str, uri: &str, base: &std::path::Path) -> vmlet::agent::Args {
    std::fs::create_dir_all(base.join("images")).unwrap();
    vmlet::agent::Args {
        node: node.to_string(),
        libvirt_uri: uri.to_string(),
        state_dir: base.join("state"),
        image_root: base.join("images"),
        accel: vmlet::agent::accel::AccelChoice::Tcg,
        reserved_memory: "0".into(),
        vm_overhead: "auto".into(),
        metrics_addr: "127.0.0.1:0".into(),
        advertise_address: None,
        migration_uri: None,
        migration_tls: true,
        orphan_grace_seconds: 5,
        lease_duration_seconds: 15,
        heartbeat_seconds: 2,
        fence_after_seconds: 0,
        kubeconfig: Some(kubeconfig_path()),
        peer_key_file: None,
        downloads: vmlet::agent::download::DownloadPolicy::allowing_loopback(),
        storage_pools: vec![],
        stream_tls_dir: None,
        stream_addr: "127.0.0.1:0".into(),
    }
}

/// Waits up to `secs` for an Event with `reason` about the object `name` in `ns` (what
/// `kubectl describe` shows); its note.
pub async fn wait_event(
    client: &kube::Client,
    ns: &str,
    name: &str,
    reason: &str,
    secs: u64,
) -> Option<String> {
    let events: kube::Api<k8s_openapi::api::core::v1::Event> =
        kube::Api::namespaced(client.clone(), ns);
    let lp = kube::api::ListParams::default().fields(&format!("involvedObject.name={name}"));
    wait_for(Duration::from_secs(secs), || async {
        let list = events.list(&lp).await.ok()?;
        list.items
            .into_iter()
            .find(|e| e.reason.as_deref() == Some(reason))
            .map(|e| e.message.unwrap_or_default())
    })
    .await
}
