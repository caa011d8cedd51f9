//! Tenants and image servers who attack through images (docs/security.md): an image that
//! names a host file as its data, URLs aimed at the node and the cluster (directly, by
//! name, through redirects), a server that answers a wrong file or too much of one, or
//! stalls; a tenant who knows another namespace's image hash. Each in-process agent runs
//! on its own test-driver node with the download policy users get by default, unless the
//! case says which exception it adds.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use kube::api::{Api, DeleteParams, PostParams};
use serde_json::json;
use sha2::Digest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vmlet::agent::download::DownloadPolicy;
use vmlet::api::{VirtualMachine, VirtualMachineImage};

use common::node::{Node, create_vm};

/// A raw HTTP server on `ip`: each connection gets `reply(path)` (head and body), or,
/// for None, the head of a long body and then nothing ever after. Counts requests.
async fn server(
    ip: &str,
    reply: impl Fn(&str) -> Option<Vec<u8>> + Send + Sync + 'static,
) -> (String, Arc<AtomicUsize>) {
    let l = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
    let base = format!("http://{}", l.local_addr().unwrap());
    let hits = Arc::new(AtomicUsize::new(0));
    let (reply, count) = (Arc::new(reply), hits.clone());
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let reply = reply.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let head = String::from_utf8_lossy(&buf[..n]).into_owned();
                let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
                match reply(&path) {
                    Some(bytes) => {
                        let _ = s.write_all(&bytes).await;
                    }
                    None => {
                        let _ = s
                            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100000000\r\n\r\nxx")
                            .await;
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                    }
                }
            });
        }
    });
    (base, hits)
}

fn ok(body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

fn redirect(to: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 302 Found\r\nLocation: {to}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .into_bytes()
}

fn sha(b: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(b))
}

async fn add_image(api: &Api<VirtualMachineImage>, name: &str, spec: serde_json::Value) {
    let img = VirtualMachineImage::new(name, serde_json::from_value(spec).unwrap());
    api.create(&PostParams::default(), &img).await.unwrap();
}

fn kernel_vm(image: &str) -> serde_json::Value {
    json!({"memory": "32Mi", "boot": {"kernel": {"name": image}, "cmdline": "console=ttyS0"}})
}

/// The VM's Ready condition once its reason is `reason`.
async fn ready_with(
    api: &Api<VirtualMachine>,
    vm: &str,
    reason: &str,
) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    common::wait_for(Duration::from_secs(30), || async {
        let v = api.get(vm).await.ok()?;
        let c = vmlet::api::conditions::find(
            &v.status.as_ref()?.conditions,
            vmlet::api::conditions::Type::Ready,
        )?
        .clone();
        (c.reason == reason).then_some(c)
    })
    .await
    .unwrap_or_else(|| {
        panic!("{vm}: Ready never had reason {reason}");
    })
}

async fn partial_files(node: &Node) -> Vec<String> {
    let mut out = Vec::new();
    for e in walk(&node.state_dir().join("image-cache")) {
        if e.ends_with(".partial") {
            out.push(e);
        }
    }
    out
}

fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p.display().to_string());
        }
    }
    out
}

/// A qcow2 whose header names a host file as its external data file
/// (`data_file_raw=on`: the guest would read and write that file directly), given as a
/// hostPath and as a download with the right checksum: refused both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_with_an_external_data_file_is_refused() {
    let client = common::client().await;
    common::ensure_crds(&client).await;
    let ns = common::namespace(&client, "img-datafile").await;
    let (vms, images) = (
        Api::namespaced(client.clone(), &ns),
        Api::namespaced(client.clone(), &ns),
    );
    let node = Node::build("datafile", None, |a| {
        a.downloads = DownloadPolicy::allowing_loopback();
    })
    .await;
    let secret = node.dir.path().join("host-disk");
    std::fs::write(&secret, vec![0u8; 1 << 20]).unwrap();
    let evil = node.image_root().join("evil.qcow2");
    let data_file = format!("data_file={},data_file_raw=on", secret.display());
    common::qemu_img([
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &data_file,
        evil.to_str().unwrap(),
        "1M",
    ]);
    let bytes = std::fs::read(&evil).unwrap();
    let (base, _) = server("127.0.0.1", {
        let bytes = bytes.clone();
        move |_| Some(ok(&bytes))
    })
    .await;
    add_image(
        &images,
        "local",
        json!({"format": "qcow2", "source": {"hostPath": {"path": evil}}}),
    )
    .await;
    add_image(&images, "served", json!({"format": "qcow2", "source": {"http": {"url": format!("{base}/evil.qcow2"), "sha256": sha(&bytes)}}})).await;
    for img in ["local", "served"] {
        let vm = format!("vm-{img}");
        let spec = json!({"memory": "32Mi", "disks": [{"name": "root", "image": {"name": img}}]});
        let uid = create_vm(&vms, &vm, spec, &node.name).await;
        let c = ready_with(&vms, &vm, "ImageHasDataFile").await;
        println!("{vm}: {}", c.message);
        assert!(c.message.contains("external file"), "{}", c.message);
        assert_eq!(
            node.domains_for(&uid).await,
            0,
            "{vm}: a domain was defined"
        );
        assert!(!node.state_dir().join("vms").join(&uid).exists());
    }
    common::delete_vms_and_namespace(&client, &ns).await;
    node.forget().await;
}

/// With the default policy, a download cannot reach this node or the cluster: not by
/// address, not by name, not through a redirect from a server it may reach, not as an
/// IPv4-mapped IPv6 address. The internal server sees no request at all. A server the
/// policy allows (127.0.0.2, the one exception) answering a wrong file gets a status that
/// carries neither the file nor its hash; one answering too much leaves no partial file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downloads_reach_only_what_the_policy_allows() {
    let client = common::client().await;
    common::ensure_crds(&client).await;
    let ns = common::namespace(&client, "img-ssrf").await;
    let (vms, images) = (
        Api::namespaced(client.clone(), &ns),
        Api::namespaced(client.clone(), &ns),
    );
    let node = Node::build("ssrf", None, |a| {
        a.downloads = DownloadPolicy {
            allow: vec!["127.0.0.2/32".parse().unwrap()],
            max_bytes: 1 << 20,
            ..DownloadPolicy::default()
        };
    })
    .await;
    let internal = b"instance-id: i-0123 secret-token: hunter2".to_vec();
    let (inside, inside_hits) = server("127.0.0.1", {
        let internal = internal.clone();
        move |_| Some(ok(&internal))
    })
    .await;
    let port = inside.rsplit(':').next().unwrap().to_string();
    let big = vec![7u8; 2 << 20];
    let (outside, _) = server("127.0.0.2", {
        let (inside, port, big) = (inside.clone(), port.clone(), big.clone());
        move |path| {
            Some(match path {
                "/to-address" => redirect(&format!("{inside}/meta")),
                "/to-name" => redirect(&format!("http://localhost:{port}/meta")),
                "/big" => ok(&big),
                _ => ok(b"a file the tenant did not expect"),
            })
        }
    })
    .await;
    let want = sha(&internal);
    let cases = [
        ("by-address", format!("{inside}/meta"), "ImageSourceRefused"),
        (
            "by-name",
            format!("http://localhost:{port}/meta"),
            "ImageSourceRefused",
        ),
        (
            "mapped",
            format!("http://[::ffff:127.0.0.1]:{port}/meta"),
            "ImageSourceRefused",
        ),
        (
            "metadata",
            "http://169.254.169.254/latest/meta-data".into(),
            "ImageSourceRefused",
        ),
        (
            "redirect-address",
            format!("{outside}/to-address"),
            "ImageSourceRefused",
        ),
        (
            "redirect-name",
            format!("{outside}/to-name"),
            "ImageSourceRefused",
        ),
        (
            "wrong-file",
            format!("{outside}/other"),
            "ImageChecksumMismatch",
        ),
        ("too-large", format!("{outside}/big"), "ImageTooLarge"),
    ];
    for (name, url, _) in &cases {
        add_image(
            &images,
            name,
            json!({"format": "kernel", "source": {"http": {"url": url, "sha256": want}}}),
        )
        .await;
        create_vm(&vms, &format!("vm-{name}"), kernel_vm(name), &node.name).await;
    }
    let other_sha = sha(b"a file the tenant did not expect");
    for (name, url, reason) in &cases {
        let c = ready_with(&vms, &format!("vm-{name}"), reason).await;
        println!("{name:<17} {url:<45} -> {reason}: {}", c.message);
        assert_eq!(c.status, "False");
        for leak in [other_sha.as_str(), "hunter2", "i-0123"] {
            assert!(
                !c.message.contains(leak),
                "{name} leaks {leak}: {}",
                c.message
            );
        }
    }
    // Each image's status holds this node's entry: Failed, with the same reason.
    for (name, _, reason) in &cases {
        let img = images.get(name).await.unwrap();
        let entry = img
            .status
            .iter()
            .flat_map(|s| s.nodes.iter())
            .find(|n| n.node == node.name)
            .unwrap_or_else(|| panic!("{name}: no entry for {} in {:?}", node.name, img.status));
        assert_eq!(entry.phase, vmlet::api::image::ImagePhase::Failed, "{name}");
        assert_eq!(entry.reason.as_deref(), Some(*reason), "{name}");
    }
    assert_eq!(
        inside_hits.load(Ordering::SeqCst),
        0,
        "the internal server was reached"
    );
    assert_eq!(partial_files(&node).await, Vec::<String>::new());
    common::delete_vms_and_namespace(&client, &ns).await;
    node.forget().await;
}

/// A server that stalls mid-body holds neither the VM's deletion nor another VM whose
/// image has the same checksum from a good server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_download_blocks_neither_deletion_nor_other_vms() {
    let client = common::client().await;
    common::ensure_crds(&client).await;
    let ns = common::namespace(&client, "img-tarpit").await;
    let (vms, images): (Api<VirtualMachine>, _) = (
        Api::namespaced(client.clone(), &ns),
        Api::namespaced(client.clone(), &ns),
    );
    let node = Node::build("tarpit", None, |a| {
        a.downloads = DownloadPolicy::allowing_loopback();
    })
    .await;
    let kernel = b"a kernel, honestly".to_vec();
    let (tarpit, _) = server("127.0.0.1", |_| None).await;
    let (good, _) = server("127.0.0.1", {
        let kernel = kernel.clone();
        move |_| Some(ok(&kernel))
    })
    .await;
    let sum = sha(&kernel);
    add_image(&images, "slow", json!({"format": "kernel", "source": {"http": {"url": format!("{tarpit}/k"), "sha256": sum}}})).await;
    add_image(&images, "fast", json!({"format": "kernel", "source": {"http": {"url": format!("{good}/k"), "sha256": sum}}})).await;
    create_vm(&vms, "stuck", kernel_vm("slow"), &node.name).await;
    let c = ready_with(&vms, "stuck", "ImageDownloading").await;
    println!("stuck: {}", c.message);
    create_vm(&vms, "other", kernel_vm("fast"), &node.name).await;
    common::node::wait_phase(&vms, "other", "Running", 30).await;
    // The images' status says so, per node: one downloading, with the bytes the stalled
    // server sent before it stopped, one ready with its size.
    let entry = |img: vmlet::api::VirtualMachineImage| {
        img.status
            .and_then(|s| s.nodes.into_iter().find(|n| n.node == node.name))
    };
    let slow = entry(images.get("slow").await.unwrap()).expect("no entry for slow");
    assert_eq!(slow.phase, vmlet::api::image::ImagePhase::Downloading);
    assert!(slow.bytes.is_some(), "{slow:?}");
    let fast = common::wait_for(Duration::from_secs(10), || async {
        entry(images.get("fast").await.ok()?)
            .filter(|e| e.phase == vmlet::api::image::ImagePhase::Ready)
    })
    .await
    .expect("fast never showed Ready for the node");
    assert_eq!(fast.size, Some(kernel.len() as i64));

    let t = Instant::now();
    vms.delete("stuck", &DeleteParams::default()).await.unwrap();
    common::wait_for(Duration::from_secs(60), || async {
        vms.get_opt("stuck").await.ok()?.is_none().then_some(())
    })
    .await
    .expect("the VM with a stalled download was not deleted within 60 s");
    println!(
        "deleted in {:.1} s while its download stalled",
        t.elapsed().as_secs_f64()
    );
    common::delete_vms_and_namespace(&client, &ns).await;
    node.forget().await;
}

/// The cache is per namespace: a tenant who names another namespace's image by its hash
/// (with a URL that cannot serve it) does not get the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_download_cache_is_private_to_a_namespace() {
    let client = common::client().await;
    common::ensure_crds(&client).await;
    let ns1 = common::namespace(&client, "img-owner").await;
    let ns2 = common::namespace(&client, "img-thief").await;
    let node = Node::build("cache", None, |a| {
        a.downloads = DownloadPolicy::allowing_loopback();
    })
    .await;
    let kernel = b"the owner's kernel".to_vec();
    let (good, _) = server("127.0.0.1", {
        let kernel = kernel.clone();
        move |_| Some(ok(&kernel))
    })
    .await;
    let sum = sha(&kernel);
    let (vms1, images1): (Api<VirtualMachine>, _) = (
        Api::namespaced(client.clone(), &ns1),
        Api::namespaced(client.clone(), &ns1),
    );
    add_image(&images1, "k", json!({"format": "kernel", "source": {"http": {"url": format!("{good}/k"), "sha256": sum}}})).await;
    create_vm(&vms1, "owner", kernel_vm("k"), &node.name).await;
    common::node::wait_phase(&vms1, "owner", "Running", 30).await;

    let (vms2, images2): (Api<VirtualMachine>, _) = (
        Api::namespaced(client.clone(), &ns2),
        Api::namespaced(client.clone(), &ns2),
    );
    // A URL that serves nothing: only the cache could give the file.
    let (empty, _) = server("127.0.0.1", |_| {
        Some(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec())
    })
    .await;
    add_image(&images2, "k", json!({"format": "kernel", "source": {"http": {"url": format!("{empty}/k"), "sha256": sum}}})).await;
    create_vm(&vms2, "thief", kernel_vm("k"), &node.name).await;
    let c = ready_with(&vms2, "thief", "ImageDownloadFailed").await;
    println!("thief: {}", c.message);
    assert!(c.message.contains("HTTP 404"), "{}", c.message);
    common::delete_vms_and_namespace(&client, &ns1).await;
    common::delete_vms_and_namespace(&client, &ns2).await;
    node.forget().await;
}
