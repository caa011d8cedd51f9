//! Consoles and displays through the Kubernetes API: the vmlet API component serves
//! `subresources.vmlet.dev` behind the API server's aggregator (an APIService whose
//! Service's EndpointSlice points at this process, on the hack/hosts.sh bridge address,
//! since endpoints may not be loopback), and opens streams on an in-process agent over
//! mutual TLS. `kubectl vm console` types a sum into the tiny guest's shell and reads the
//! result, logged in with a client certificate and with a ServiceAccount token; a user
//! with only the view role is refused; `kubectl vm vnc` forwards a port whose first bytes
//! are the RFB banner.
//!
//! Needs `hack/cluster.sh up` (front proxy), `hack/libvirt.sh up` and `hack/hosts.sh up`.

mod common;

use std::io::{BufRead, Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::kube_aggregator::pkg::apis::apiregistration::v1::APIService;
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::json;
use vmlet::agent::libvirt::Connection;
use vmlet::api::VirtualMachine;
use vmlet::api::streams::API_SERVICE;

/// The host's address on the bridge of hack/hosts.sh: reachable by the API server, and
/// not loopback (which an EndpointSlice refuses).
const BRIDGE: &str = "10.77.0.254";

struct Pki {
    dir: tempfile::TempDir,
    serving_ca: String,
}

/// Writes `<dir>/<name>/{ca.crt,tls.crt,tls.key}` for a certificate issued by `ca`.
fn issue(
    dir: &Path,
    name: &str,
    ca: &rcgen::Issuer<'_, rcgen::KeyPair>,
    ca_pem: &str,
    cn: &str,
    sans: Vec<String>,
    usage: rcgen::ExtendedKeyUsagePurpose,
) {
    let mut params = rcgen::CertificateParams::new(sans).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    params.extended_key_usages = vec![usage];
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, ca).unwrap();
    let d = dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("ca.crt"), ca_pem).unwrap();
    std::fs::write(d.join("tls.crt"), cert.pem()).unwrap();
    std::fs::write(d.join("tls.key"), key.serialize_pem()).unwrap();
}

fn ca(cn: &str) -> (rcgen::Issuer<'static, rcgen::KeyPair>, String) {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    let pem = cert.pem();
    (rcgen::Issuer::new(params, key), pem)
}

/// The stream CA with the agent's and the API component's certificates, and a serving
/// CA with the API component's serving certificate for its Service's DNS name.
fn pki(service_dns: &str) -> Pki {
    use rcgen::ExtendedKeyUsagePurpose::{ClientAuth, ServerAuth};
    let dir = tempfile::tempdir().unwrap();
    let (streams, streams_pem) = ca("vmlet-streams-ca");
    issue(
        dir.path(),
        "agent",
        &streams,
        &streams_pem,
        "vmlet-agent",
        vec!["vmlet-agent".into()],
        ServerAuth,
    );
    issue(
        dir.path(),
        "api",
        &streams,
        &streams_pem,
        "vmlet-api",
        vec![],
        ClientAuth,
    );
    let (serving, serving_pem) = ca("vmlet-api-serving-ca");
    issue(
        dir.path(),
        "serving",
        &serving,
        &serving_pem,
        service_dns,
        vec![service_dns.into()],
        ServerAuth,
    );
    Pki {
        dir,
        serving_ca: serving_pem,
    }
}

fn api_services(client: &kube::Client) -> Api<APIService> {
    Api::all(client.clone())
}

fn tool(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(".cache/bin")
        .join(name)
}

/// `kubectl` with the plugin on PATH and `kubeconfig`; stdin written, then closed.
fn kubectl(kubeconfig: &Path, args: &[&str], stdin: &str) -> std::process::Output {
    let plugin_dir = Path::new(env!("CARGO_BIN_EXE_kubectl-vm"))
        .parent()
        .unwrap();
    let path = format!(
        "{}:{}",
        plugin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut child = Command::new(tool("kubectl"))
        .args(args)
        .env("PATH", path)
        .env("KUBECONFIG", kubeconfig)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// A kubeconfig for the same cluster whose user is `user` (a kubeconfig user entry).
fn kubeconfig_with(dir: &Path, name: &str, user: serde_json::Value) -> std::path::PathBuf {
    let admin = std::fs::read_to_string(common::kubeconfig_path()).unwrap();
    let mut kc: serde_json::Value = serde_saphyr::from_str(&admin).unwrap();
    kc["users"] = json!([{"name": name, "user": user}]);
    kc["contexts"][0]["context"]["user"] = json!(name);
    let path = dir.join(format!("{name}.kubeconfig"));
    std::fs::write(&path, serde_saphyr::to_string(&kc).unwrap()).unwrap();
    path
}

/// A kubeconfig for the same cluster that logs in with `token`.
fn token_kubeconfig(dir: &Path, name: &str, token: &str) -> std::path::PathBuf {
    kubeconfig_with(dir, name, json!({"token": token}))
}

async fn setup_api(client: &kube::Client, ns: &str, pki: &Pki) {
    let listener = tokio::net::TcpListener::bind((BRIDGE, 0))
        .await
        .expect("the hack/hosts.sh bridge address (run hack/hosts.sh up)");
    let port = listener.local_addr().unwrap().port();
    let args = vmlet::subresources::Args {
        listen: String::new(),
        serving_dir: pki.dir.path().join("serving"),
        stream_tls_dir: pki.dir.path().join("api"),
        kubeconfig: Some(common::kubeconfig_path()),
    };
    tokio::spawn(async move {
        if let Err(e) = vmlet::subresources::serve(args, listener).await {
            panic!("the API component stopped: {e}");
        }
    });
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": "vmlet-api"},
        "spec": {"ports": [{"name": "https", "port": 443, "targetPort": port}]},
    }))
    .unwrap();
    Api::<Service>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &svc)
        .await
        .unwrap();
    let slice: EndpointSlice = serde_json::from_value(json!({
        "metadata": {"name": "vmlet-api", "labels": {"kubernetes.io/service-name": "vmlet-api"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [BRIDGE], "conditions": {"ready": true}}],
        "ports": [{"name": "https", "port": port, "protocol": "TCP"}],
    }))
    .unwrap();
    Api::<EndpointSlice>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &slice)
        .await
        .unwrap();
    let mut apisvc: APIService = serde_json::from_value(json!({
        "metadata": {"name": API_SERVICE},
        "spec": {"group": "subresources.vmlet.dev", "version": "v1alpha1",
                 "service": {"namespace": ns, "name": "vmlet-api", "port": 443},
                 "groupPriorityMinimum": 1000, "versionPriority": 15},
    }))
    .unwrap();
    apisvc.spec.as_mut().unwrap().ca_bundle =
        Some(k8s_openapi::ByteString(pki.serving_ca.clone().into_bytes()));
    let apis = api_services(client);
    let _ = apis.delete(API_SERVICE, &DeleteParams::default()).await;
    let created = common::wait_for(Duration::from_secs(30), || async {
        apis.create(&PostParams::default(), &apisvc).await.ok()
    })
    .await;
    assert!(created.is_some(), "could not register the APIService");
    let available = common::wait_for(Duration::from_secs(60), || async {
        let a = apis.get(API_SERVICE).await.ok()?;
        a.status?
            .conditions?
            .iter()
            .any(|c| c.type_ == "Available" && c.status == "True")
            .then_some(())
    })
    .await;
    assert!(
        available.is_some(),
        "the APIService never became Available: {:?}",
        apis.get(API_SERVICE).await.ok().and_then(|a| a.status)
    );
}

/// The chart's user ClusterRoles for `release`, applied; their YAML.
fn user_roles(release: &str) -> String {
    let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/vmlet");
    let out = Command::new(tool("helm"))
        .args([
            "template",
            release,
            chart.to_str().unwrap(),
            "--show-only",
            "templates/rbac-users.yaml",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let yaml = String::from_utf8(out.stdout).unwrap();
    let out = kubectl(&common::kubeconfig_path(), &["apply", "-f", "-"], &yaml);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    yaml
}

/// A ServiceAccount bound to the ClusterRole `role` in `ns`; its token.
fn account(ns: &str, name: &str, role: &str) -> String {
    let admin = common::kubeconfig_path();
    for args in [
        vec!["create", "serviceaccount", name, "-n", ns],
        vec![
            "create",
            "rolebinding",
            name,
            "-n",
            ns,
            "--clusterrole",
            role,
            &format!("--serviceaccount={ns}:{name}"),
        ],
    ] {
        let out = kubectl(&admin, &args, "");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = kubectl(&admin, &["create", "token", name, "-n", ns], "");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Removes the APIService also when the test fails: one whose server is gone makes
/// discovery fail, and with it every namespace deletion in the cluster.
struct Unregister;

impl Drop for Unregister {
    fn drop(&mut self) {
        let _ = Command::new(tool("kubectl"))
            .args(["delete", "apiservice", API_SERVICE, "--ignore-not-found"])
            .env("KUBECONFIG", common::kubeconfig_path())
            .output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_types_into_the_console_and_opens_the_display() {
    let _unregister = Unregister;
    vmlet::telemetry::init(Default::default());
    let client = common::client().await;
    common::ensure_crds(&client).await;
    let ns = common::namespace(&client, "console").await;
    let pki = pki(&format!("vmlet-api.{ns}.svc"));
    setup_api(&client, &ns, &pki).await;
    // The chart's user roles, aggregated into the built-in edit and view: edit may
    // open consoles and displays, view may not.
    let release = format!("console{}", std::process::id());
    let roles = user_roles(&release);
    let cluster_roles: Api<k8s_openapi::api::rbac::v1::ClusterRole> = Api::all(client.clone());
    let aggregated = common::wait_for(Duration::from_secs(30), || async {
        let edit = cluster_roles.get("edit").await.ok()?;
        edit.rules?
            .iter()
            .any(|r| {
                r.api_groups
                    .as_ref()
                    .is_some_and(|g| g.iter().any(|g| g == "subresources.vmlet.dev"))
            })
            .then_some(())
    })
    .await;
    assert!(
        aggregated.is_some(),
        "the chart's rules never reached the edit role"
    );

    let dir = common::qemu_tempdir();
    let node = format!("console-{}", std::process::id());
    common::node_with_address(&client, &node, json!({}), "127.0.0.1").await;
    let lv = Arc::new(Connection::open("qemu:///system").await.expect("libvirtd"));
    let args = vmlet::agent::Args {
        stream_tls_dir: Some(pki.dir.path().join("agent")),
        ..common::agent_args(&node, "qemu:///system", dir.path())
    };
    let agent = tokio::spawn(vmlet::agent::run_with(args, lv, std::future::pending()));
    common::tiny_guest_images(&client, &ns).await;
    let vms: Api<VirtualMachine> = Api::namespaced(client.clone(), &ns);
    let spec = json!({
        "runStrategy": "Always", "memory": "128Mi", "graphics": true,
        "boot": {"kernel": {"name": "tiny-kernel"}, "initrd": {"name": "tiny-initrd"},
                 "cmdline": "console=ttyS0 panic=-1 vmlet.shell=1"},
    });
    let vm = VirtualMachine::new("tiny", serde_json::from_value(spec).unwrap());
    let uid = vms
        .create(&PostParams::default(), &vm)
        .await
        .unwrap()
        .metadata
        .uid
        .unwrap();
    common::node::bind(&vms, "tiny", &node).await;
    let log = dir.path().join("state/vms").join(&uid).join("console.log");
    let up = common::wait_for(Duration::from_secs(120), || async {
        std::fs::read_to_string(&log)
            .ok()?
            .contains("vmlet-shell-up")
            .then_some(())
    })
    .await;
    assert!(up.is_some(), "the guest's shell never started");

    // Typed through the console, run by the guest's shell, read back: a client
    // certificate login (the admin kubeconfig) and a ServiceAccount token with edit.
    let editor_token = account(&ns, "editor", "edit");
    let editor = token_kubeconfig(dir.path(), "editor", &editor_token);
    // An exec credential plugin, as cloud logins use: it prints the token kube-rs sends.
    let credential = json!({"apiVersion": "client.authentication.k8s.io/v1",
        "kind": "ExecCredential", "status": {"token": editor_token}});
    let exec = kubeconfig_with(
        dir.path(),
        "exec",
        json!({"exec": {"apiVersion": "client.authentication.k8s.io/v1", "command": "sh",
            "args": ["-c", format!("printf '%s' '{credential}'")],
            "interactiveMode": "Never"}}),
    );
    for (who, kubeconfig, n) in [
        ("client certificate", common::kubeconfig_path(), 1),
        ("token", editor.clone(), 2),
        ("exec plugin", exec, 3),
    ] {
        let typed = format!("echo vmlet-$((4000+{n}))\n");
        let out = kubectl(
            &kubeconfig,
            &["vm", "console", "tiny", "-n", &ns, "--idle", "1s"],
            &typed,
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains(&format!("vmlet-{}", 4000 + n)),
            "{who}: the sum did not come back: {text:?} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        println!("console via {who}: ok");
    }

    // view may read VMs, not open their consoles.
    let viewer = token_kubeconfig(dir.path(), "viewer", &account(&ns, "viewer", "view"));
    let out = kubectl(&viewer, &["vm", "console", "tiny", "-n", &ns], "");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("forbidden"),
        "viewer: {err}"
    );

    // The display: a local port whose first bytes are the RFB banner.
    let plugin = Path::new(env!("CARGO_BIN_EXE_kubectl-vm"));
    let mut child = Command::new(plugin)
        .args(["vnc", "tiny", "-n", &ns, "--no-launch"])
        .env("KUBECONFIG", &editor)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .split_whitespace()
        .find(|w| w.starts_with("127.0.0.1:"))
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_string();
    let banner = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut b = [0u8; 12];
        s.read_exact(&mut b).map(|_| b)
    })
    .await
    .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let banner = banner.expect("no bytes from the display");
    assert_eq!(&banner, b"RFB 003.008\n");

    let _ = api_services(&client)
        .delete(API_SERVICE, &DeleteParams::default())
        .await;
    let out = kubectl(&common::kubeconfig_path(), &["delete", "-f", "-"], &roles);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    common::delete_vms_and_namespace(&client, &ns).await;
    agent.abort();
    common::forget_node(&client, &node).await;
}
