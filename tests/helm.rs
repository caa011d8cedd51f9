//! The Helm chart against the real control plane: lint, server-side dry run of the
//! rendered manifests, and install / uninstall of every object. Its Pods never run (an
//! image that is not there, never pulled): these tests check objects; tests/helm_node.rs
//! runs the chart's Pods.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn bin(name: &str) -> PathBuf {
    let local = root().join(".cache/bin").join(name);
    if local.exists() {
        local
    } else {
        PathBuf::from(name)
    }
}

fn run(cmd: &str, args: &[&str], stdin: Option<&str>) -> Output {
    common::cli(cmd, args, stdin)
}

fn ok(out: Output, what: &str) -> String {
    common::cli_ok(out, what)
}

fn chart() -> String {
    root().join("charts/vmlet").to_string_lossy().into_owned()
}

#[test]
fn chart_lints_strictly() {
    ok(
        run("helm", &["lint", "--strict", &chart()], None),
        "helm lint --strict",
    );
}

#[test]
fn chart_crds_are_the_generated_ones() {
    let mut files: Vec<_> = std::fs::read_dir(root().join("crds"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    files.sort();
    let mut chart_files: Vec<_> = std::fs::read_dir(root().join("charts/vmlet/crds"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    chart_files.sort();
    assert_eq!(
        files, chart_files,
        "charts/vmlet/crds must hold exactly crds/ (make crds copies them)"
    );
    for f in files {
        let a = std::fs::read(root().join("crds").join(&f)).unwrap();
        let b = std::fs::read(root().join("charts/vmlet/crds").join(&f)).unwrap();
        assert!(
            a == b,
            "charts/vmlet/crds/{} differs from crds/ (run make crds)",
            f.to_string_lossy()
        );
    }
}

/// Every object in a multi-document manifest: (kind, namespace, name).
fn objects(manifest: &str) -> Vec<(String, Option<String>, String)> {
    serde_yaml::Deserializer::from_str(manifest)
        .filter_map(|d| {
            let v: serde_json::Value = serde::Deserialize::deserialize(d).ok()?;
            let kind = v["kind"].as_str()?.to_string();
            let ns = v["metadata"]["namespace"].as_str().map(String::from);
            Some((kind, ns, v["metadata"]["name"].as_str()?.to_string()))
        })
        .collect()
}

/// `helm template` with no cluster at all, as a GitOps pipeline renders the chart: helm's
/// default Kubernetes version (set at build time by hack/cluster.sh) satisfies the chart's
/// kubeVersion, so the pinned helm renders it without --kube-version.
#[test]
fn chart_renders_with_no_cluster() {
    let out = Command::new(bin("helm"))
        .args(["template", "vmlet", &chart()])
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .output()
        .expect("helm (hack/cluster.sh build)");
    let rendered = ok(out, "helm template with no cluster");
    assert!(objects(&rendered).len() >= 18, "{rendered}");
    let version = ok(
        Command::new(bin("helm"))
            .args(["version", "--template", "{{.Version}}"])
            .output()
            .unwrap(),
        "helm version",
    );
    assert!(version.starts_with("v3."), "helm reports {version:?}");
}

#[tokio::test]
async fn rendered_chart_passes_a_server_side_dry_run() {
    let client = common::client().await;
    common::ensure_crds(&client).await;
    let ns = common::namespace(&client, "chart-dry").await;
    let rendered = ok(
        run(
            "helm",
            &[
                "template",
                "dry",
                &chart(),
                "-n",
                &ns,
                "--include-crds",
                "--kube-version",
                "v1.37.2",
                "--set",
                "metrics.serviceMonitor.enabled=false",
            ],
            None,
        ),
        "helm template",
    );
    assert!(objects(&rendered).len() >= 18);
    ok(
        run(
            "kubectl",
            &["apply", "--dry-run=server", "-f", "-"],
            Some(&rendered),
        ),
        "kubectl apply --dry-run=server",
    );
    common::delete_namespace(&client, &ns).await;
}

#[tokio::test]
async fn install_creates_every_object_and_uninstall_removes_them() {
    let client = common::client().await;
    common::ensure_crds(&client).await;
    let ns = common::namespace(&client, "chart-install").await;
    let release = format!("it{}", std::process::id());
    ok(
        // The real node (hack/node.sh) runs Pods: they must not try to pull the
        // release's image from a registry.
        run(
            "helm",
            &[
                "install",
                &release,
                &chart(),
                "-n",
                &ns,
                "--set",
                "image.repository=vmlet.invalid/none",
                "--set",
                "image.pullPolicy=Never",
            ],
            None,
        ),
        "helm install",
    );
    let manifest = ok(
        run("helm", &["get", "manifest", &release, "-n", &ns], None),
        "helm get manifest",
    );
    let objs = objects(&manifest);
    for kind in [
        "Deployment",
        "DaemonSet",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "Service",
        "ConfigMap",
        "PodDisruptionBudget",
    ] {
        assert!(
            objs.iter().any(|(k, _, _)| k == kind),
            "chart has no {kind}"
        );
    }
    let get = |kind: &str, ns: &Option<String>, name: &str| {
        let mut args = vec![
            "get".to_string(),
            kind.to_lowercase(),
            name.to_string(),
            "-o".into(),
            "name".into(),
        ];
        if let Some(n) = ns {
            args.extend(["-n".to_string(), n.clone()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run("kubectl", &args, None)
    };
    for (kind, obj_ns, name) in &objs {
        assert!(
            get(kind, obj_ns, name).status.success(),
            "{kind} {name} not created"
        );
    }
    // No role of ours grants a wildcard, in any field of any rule.
    let mut roles = 0;
    for doc in serde_yaml::Deserializer::from_str(&manifest) {
        let v: serde_json::Value = serde::Deserialize::deserialize(doc).unwrap();
        if !matches!(v["kind"].as_str(), Some("ClusterRole" | "Role")) {
            continue;
        }
        roles += 1;
        for rule in v["rules"].as_array().into_iter().flatten() {
            for field in [
                "apiGroups",
                "resources",
                "verbs",
                "resourceNames",
                "nonResourceURLs",
            ] {
                let wild = rule[field]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|x| x.as_str().is_some_and(|s| s.contains('*')));
                assert!(
                    !wild,
                    "{} {} grants a wildcard in {field}",
                    v["kind"], v["metadata"]["name"]
                );
            }
        }
    }
    assert!(
        roles >= 4,
        "expected separate roles for controller and agent"
    );
    ok(
        run("helm", &["uninstall", &release, "-n", &ns, "--wait"], None),
        "helm uninstall",
    );
    for (kind, obj_ns, name) in &objs {
        assert!(
            !get(kind, obj_ns, name).status.success(),
            "{kind} {name} left behind by uninstall"
        );
    }
    common::delete_namespace(&client, &ns).await;
}
