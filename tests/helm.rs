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

/// `helm install` of the chart with an image that is never pulled (the real node of
/// hack/node.sh runs Pods: they must not reach for a registry), plus `sets`; the
/// release's manifest.
fn install_without_pods(release: &str, ns: &str, sets: &[&str]) -> String {
    let mut args: Vec<String> = ["install", release, &chart(), "-n", ns]
        .map(String::from)
        .to_vec();
    for set in [
        "image.repository=vmlet.invalid/none",
        "image.pullPolicy=Never",
    ]
    .iter()
    .chain(sets)
    {
        args.extend(["--set".to_string(), set.to_string()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    ok(run("helm", &args, None), &format!("helm install {release}"));
    ok(
        run("helm", &["get", "manifest", release, "-n", ns], None),
        "helm get manifest",
    )
}

/// Every object in a multi-document manifest: (kind, namespace, name).
fn objects(manifest: &str) -> Vec<(String, Option<String>, String)> {
    documents(manifest)
        .into_iter()
        .filter_map(|v| {
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
                // The test hook's Pod names a ServiceAccount that a dry run never creates.
                "--skip-tests",
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
    let manifest = install_without_pods(&release, &ns, &[]);
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
    for v in documents(&manifest) {
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

/// `helm template` of the chart with `--set` pairs; its output, or helm's error text.
fn template(sets: &[&str]) -> Result<String, String> {
    let mut args: Vec<String> = vec!["template".into(), "t".into(), chart()];
    for s in sets {
        args.extend(["--set".to_string(), s.to_string()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run("helm", &args, None);
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// values.schema.json is strict: a misspelt key or a value outside its set is refused with
/// the path, where without a schema helm ignores it silently.
#[test]
fn values_schema_refuses_typos_and_bad_values() {
    // (--set, what the error must name; None: renders)
    let table: [(&str, Option<&str>); 8] = [
        ("controller.stratgy=pack", Some("'stratgy' not allowed")),
        ("controller.strategy=packed", Some("/controller/strategy")),
        ("logFormat=xml", Some("/logFormat")),
        ("agent.accel=hvf", Some("/agent/accel")),
        ("agent.imageRoot=relative/dir", Some("/agent/imageRoot")),
        (
            "metrics.prometheusRule.enabeld=true",
            Some("'enabeld' not allowed"),
        ),
        ("controller.strategy=pack", None),
        ("agent.podLabels.team=vms", None),
    ];
    for (set, refused) in table {
        match (template(&[set]), refused) {
            (Ok(_), None) => {}
            (Err(e), Some(want)) => assert!(e.contains(want), "--set {set}: {e}"),
            (Ok(_), Some(want)) => panic!("--set {set} rendered; want an error naming {want}"),
            (Err(e), None) => panic!("--set {set} refused: {e}"),
        }
    }
}

/// The chart's options for the Pods land where the values say.
#[test]
fn pod_options_reach_the_pods() {
    let out = template(&[
        "agent.podAnnotations.example\\.com/a=one",
        "controller.podLabels.team=vms",
        "controller.priorityClassName=vmlet-high",
        "agent.extraEnv[0].name=HTTPS_PROXY",
        "agent.extraEnv[0].value=http://proxy:3128",
    ])
    .unwrap();
    let docs = documents(&out);
    let pod = |kind: &str| {
        docs.iter()
            .find(|d| d["kind"] == kind)
            .map(|d| d["spec"]["template"].clone())
            .unwrap()
    };
    let (agent, controller) = (pod("DaemonSet"), pod("Deployment"));
    assert_eq!(agent["metadata"]["annotations"]["example.com/a"], "one");
    assert_eq!(agent["spec"]["priorityClassName"], "system-node-critical");
    assert_eq!(controller["spec"]["priorityClassName"], "vmlet-high");
    assert_eq!(controller["metadata"]["labels"]["team"], "vms");
    let env = agent["spec"]["containers"][0]["env"].as_array().unwrap();
    assert!(
        env.iter()
            .any(|e| e["name"] == "HTTPS_PROXY" && e["value"] == "http://proxy:3128"),
        "{env:?}"
    );
    // Pod labels never replace the selector's.
    assert_eq!(
        controller["metadata"]["labels"]["app.kubernetes.io/component"],
        "controller"
    );
}

/// Every alert of the PrometheusRule has a severity, a summary and a runbook section in
/// docs/runbooks.md; the metrics they query are checked against the exporters by the
/// unit tests of both metrics modules.
#[test]
fn every_alert_has_a_runbook_section() {
    let out = template(&[
        "metrics.prometheusRule.enabled=true",
        "metrics.prometheusRule.runbookBaseURL=https://example.com/runbooks.md",
    ])
    .unwrap();
    let rule = documents(&out)
        .into_iter()
        .find(|d| d["kind"] == "PrometheusRule")
        .expect("a PrometheusRule");
    let runbooks = std::fs::read_to_string(root().join("docs/runbooks.md")).unwrap();
    let anchors: Vec<String> = runbooks
        .lines()
        .filter_map(|l| l.strip_prefix("## "))
        .map(|h| h.trim().to_lowercase())
        .collect();
    let rules = rule["spec"]["groups"][0]["rules"].as_array().unwrap();
    let names: Vec<&str> = rules.iter().filter_map(|r| r["alert"].as_str()).collect();
    for want in [
        "VmletAgentDown",
        "VmletHeartbeatStale",
        "VmletNodeFenced",
        "VmletMigrationsFailing",
        "VmletVMsUnschedulable",
        "VmletImageDownloadsFailing",
    ] {
        assert!(names.contains(&want), "no alert {want}: {names:?}");
    }
    for r in rules {
        let name = r["alert"].as_str().unwrap();
        let anchor = name.to_lowercase();
        assert!(
            anchors.contains(&anchor),
            "docs/runbooks.md has no ## {name}"
        );
        assert_eq!(
            r["annotations"]["runbook_url"],
            format!("https://example.com/runbooks.md#{anchor}")
        );
        assert!(r["labels"]["severity"].is_string(), "{name}");
        assert!(r["annotations"]["summary"].is_string(), "{name}");
        assert!(r["expr"].as_str().unwrap().contains("job=\"t-"), "{name}");
    }
    // And no section without an alert.
    assert_eq!(anchors.len(), rules.len(), "{anchors:?}");
}

/// Every document of a manifest as JSON.
fn documents(manifest: &str) -> Vec<serde_json::Value> {
    let docs: Vec<serde_json::Value> =
        serde_saphyr::from_multiple(manifest).expect("the manifest is YAML");
    docs.into_iter().filter(|v| !v.is_null()).collect()
}

/// Two releases in one namespace: both install, each with its own leader Lease and its
/// own cluster-scoped objects (the APIService, one per cluster, left to one release).
#[tokio::test]
async fn two_releases_install_side_by_side() {
    let client = common::client().await;
    common::ensure_crds(&client).await;
    let ns = common::namespace(&client, "chart-two").await;
    let releases = [
        format!("a{}", std::process::id()),
        format!("b{}", std::process::id()),
    ];
    let mut leases = vec![];
    for release in &releases {
        // The APIService is one per cluster: here the suite's other installs hold it,
        // so that both of these leave it alone; install_creates_every_object... and
        // tests/helm_node.rs install it.
        let manifest = install_without_pods(release, &ns, &["api.registerAPIService=false"]);
        let deployment = documents(&manifest)
            .into_iter()
            .find(|d| d["kind"] == "Deployment")
            .unwrap();
        let args = deployment["spec"]["template"]["spec"]["containers"][0]["args"].clone();
        let lease = args
            .as_array()
            .unwrap()
            .iter()
            .find_map(|a| a.as_str()?.strip_prefix("--leader-lease="))
            .map(String::from)
            .expect("--leader-lease");
        assert_eq!(lease, format!("{release}-controller"));
        leases.push(lease);
    }
    assert_ne!(leases[0], leases[1]);
    for release in &releases {
        ok(
            run("helm", &["uninstall", release, "-n", &ns, "--wait"], None),
            "helm uninstall",
        );
    }
    common::delete_namespace(&client, &ns).await;
}

/// The dashboard narrows by namespace, node and VM, and its rates follow Grafana's
/// `$__rate_interval` (four scrape intervals) instead of a fixed window that breaks with
/// a scrape interval above it.
#[test]
fn dashboard_has_variables_and_no_fixed_rate_windows() {
    let text = std::fs::read_to_string(root().join("charts/vmlet/dashboards/vmlet.json")).unwrap();
    let d: serde_json::Value = serde_json::from_str(&text).unwrap();
    let vars: Vec<&str> = d["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    for want in ["datasource", "namespace", "node", "vm"] {
        assert!(vars.contains(&want), "no ${want} variable: {vars:?}");
    }
    let mut per_vm = 0;
    for panel in d["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap();
            if expr.contains("rate(") {
                assert!(expr.contains("[$__rate_interval]"), "{expr}");
            }
            for (i, _) in expr.match_indices("vmlet_vm_") {
                per_vm += 1;
                let rest = &expr[i..];
                let selector = &rest[rest.find(['{', ')', ' ']).unwrap_or(rest.len())..];
                assert!(
                    selector.starts_with("{namespace=~\"$namespace\", name=~\"$vm\"}"),
                    "per-VM series not narrowed by the variables: {expr}"
                );
            }
        }
    }
    assert!(per_vm >= 6, "{per_vm} per-VM queries");
}
