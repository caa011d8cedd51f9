//! The vmlet API component: serves `subresources.vmlet.dev/v1alpha1` behind the
//! Kubernetes API server (an APIService), so `kubectl vm console` and `kubectl vm vnc`
//! work with any login the cluster accepts and no user credential leaves the API
//! server. A request arrives with the user in front-proxy headers (`requestheader`),
//! is authorised by a SubjectAccessReview on `virtualmachines/console` or `/vnc`, and is
//! relayed as a WebSocket to the agent of the VM's node over mutual TLS (`agent::streams`
//! on the other side), which opens the guest's console or display through libvirt.

pub mod discovery;
mod relay;
pub mod requestheader;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, PostParams};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

use crate::api::streams::{GROUP, MAX_HANDSHAKE, StreamKind, StreamReply, StreamRequest};
use crate::api::{Hypervisor, VirtualMachine};

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Where to listen: the APIService's Service points here.
    #[arg(long, default_value = "0.0.0.0:8443")]
    pub listen: String,
    /// A directory with `tls.crt` and `tls.key`: the serving certificate the APIService's
    /// caBundle trusts.
    #[arg(long, env = "VMLET_API_SERVING_DIR")]
    pub serving_dir: PathBuf,
    /// A directory with `ca.crt`, `tls.crt` and `tls.key`: this component's client
    /// certificate for the agents' streams, and the CA of the agents' certificates.
    #[arg(long, env = "VMLET_STREAM_TLS_DIR")]
    pub stream_tls_dir: PathBuf,
    /// Kubeconfig to use instead of in-cluster config or $KUBECONFIG.
    #[arg(long, env = "VMLET_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
}

/// How long dialling an agent and its answer may take.
const AGENT_TIMEOUT: Duration = Duration::from_secs(10);

struct State {
    client: kube::Client,
    header: requestheader::Config,
    agents: tokio_rustls::TlsConnector,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(&args.listen).await?;
    serve(args, listener).await
}

/// Serves on `listener` until the process ends.
pub async fn serve(args: Args, listener: tokio::net::TcpListener) -> anyhow::Result<()> {
    let client = crate::kubeconfig::client(args.kubeconfig.as_ref()).await?;
    let (ns, name) = requestheader::CONFIG_MAP;
    let cm = Api::<ConfigMap>::namespaced(client.clone(), ns)
        .get(name)
        .await
        .map_err(|e| anyhow::anyhow!("reading {ns}/{name}: {e}"))?;
    let header = requestheader::config(&cm).map_err(|e| anyhow::anyhow!(e))?;
    let proxy_ca = crate::tls::roots(crate::tls::certs_in(&header.client_ca)?)?;
    let tls = crate::tls::server(
        crate::tls::certs(&args.serving_dir.join("tls.crt"))?,
        crate::tls::key(&args.serving_dir.join("tls.key"))?,
        proxy_ca,
        true,
    )?;
    let b = crate::tls::Bundle::load(&args.stream_tls_dir)?;
    let agents = crate::tls::client(b.ca, b.cert, b.key)?;
    let state = Arc::new(State {
        client,
        header,
        agents: tokio_rustls::TlsConnector::from(Arc::new(agents)),
    });
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    tracing::info!(addr = %listener.local_addr()?, "serving {GROUP}");
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let (acceptor, state) = (acceptor.clone(), state.clone());
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let cn = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(crate::tls::common_name);
            let svc = hyper::service::service_fn(move |req| {
                let (state, cn) = (state.clone(), cn.clone());
                async move { Ok::<_, std::convert::Infallible>(route(&state, cn, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), svc)
                .with_upgrades()
                .await;
        });
    }
}

type Reply = Response<Full<Bytes>>;

/// A `metav1.Status` failure, which kubectl and kube-rs show as the error.
fn status(code: StatusCode, reason: &str, message: impl Into<String>) -> Reply {
    let body = serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "status": "Failure",
        "message": message.into(), "reason": reason, "code": code.as_u16(),
    });
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("static response parts")
}

/// The API server could not be asked (for the VM, for a review).
fn unavailable(e: kube::Error) -> Reply {
    status(
        StatusCode::SERVICE_UNAVAILABLE,
        "ServiceUnavailable",
        e.to_string(),
    )
}

async fn route(state: &State, cn: Option<String>, req: Request<Incoming>) -> Reply {
    let path = req.uri().path().to_string();
    if path == "/healthz" || path == "/readyz" || path == "/livez" {
        return Response::new(Full::new(Bytes::from_static(b"ok")));
    }
    if let Some(doc) = discovery::document(&path) {
        let accept = req
            .headers()
            .get(http::header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        if accept.contains("apidiscovery.k8s.io") && !accept.contains("application/json,") {
            return status(
                StatusCode::NOT_ACCEPTABLE,
                "NotAcceptable",
                "legacy discovery only",
            );
        }
        return Response::builder()
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(doc.to_string())))
            .expect("static response parts");
    }
    let Some((ns, name, sub)) = discovery::stream_path(&path) else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("{path} not found"),
        );
    };
    let Some(kind) = StreamKind::from_subresource(sub) else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("no subresource {sub}"),
        );
    };
    let (ns, name) = (ns.to_string(), name.to_string());
    match open(state, cn.as_deref(), &req, kind, &ns, &name).await {
        Ok(agent) => relay::upgrade(req, agent),
        Err(reply) => reply,
    }
}

/// Everything before the upgrade: who asks, whether they may, which VM and node, and the
/// agent's stream, opened. Any failure is an HTTP answer the user reads.
async fn open(
    state: &State,
    cn: Option<&str>,
    req: &Request<Incoming>,
    kind: StreamKind,
    ns: &str,
    name: &str,
) -> Result<relay::AgentStream, Reply> {
    if !relay::is_websocket(req) {
        return Err(status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "a WebSocket upgrade is required",
        ));
    }
    let Some(user) = requestheader::user(&state.header, cn, req.headers()) else {
        return Err(status(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "not a request from the API server's front proxy",
        ));
    };
    authorize(state, &user, kind, ns, name).await?;
    let vm = Api::<VirtualMachine>::namespaced(state.client.clone(), ns)
        .get_opt(name)
        .await
        .map_err(unavailable)?
        .ok_or_else(|| {
            status(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("virtualmachines {name:?} not found"),
            )
        })?;
    let conflict = |m: String| status(StatusCode::CONFLICT, "Conflict", m);
    let node = vm
        .status
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .ok_or_else(|| conflict(format!("VM {name} is not on a node yet")))?;
    let addr = Api::<Hypervisor>::all(state.client.clone())
        .get_opt(&node)
        .await
        .ok()
        .flatten()
        .and_then(|h| h.status?.stream_address)
        .ok_or_else(|| {
            status(
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                format!(
                    "the agent on node {node} offers no streams (it has no stream certificate)"
                ),
            )
        })?;
    let request = StreamRequest {
        kind,
        namespace: ns.to_string(),
        name: name.to_string(),
        uid: vm.metadata.uid.clone().unwrap_or_default(),
    };
    tokio::time::timeout(AGENT_TIMEOUT, dial(state, &addr, &request))
        .await
        .unwrap_or_else(|_| Err(format!("the agent on node {node} did not answer in time")))
        .map_err(conflict)
}

async fn authorize(
    state: &State,
    user: &requestheader::User,
    kind: StreamKind,
    ns: &str,
    name: &str,
) -> Result<(), Reply> {
    let sar = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(user.name.clone()),
            groups: Some(user.groups.clone()),
            extra: Some(user.extra.clone()),
            resource_attributes: Some(ResourceAttributes {
                group: Some(GROUP.into()),
                resource: Some("virtualmachines".into()),
                subresource: Some(kind.subresource().into()),
                verb: Some("get".into()),
                namespace: Some(ns.into()),
                name: Some(name.into()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let allowed = Api::<SubjectAccessReview>::all(state.client.clone())
        .create(&PostParams::default(), &sar)
        .await
        .map_err(unavailable)?
        .status
        .is_some_and(|s| s.allowed);
    if allowed {
        return Ok(());
    }
    Err(status(
        StatusCode::FORBIDDEN,
        "Forbidden",
        format!(
            "virtualmachines/{} {name:?} is forbidden: user {:?} cannot get it in the namespace {ns:?}",
            kind.subresource(),
            user.name
        ),
    ))
}

/// Connects to the agent at `addr`, sends the request line, reads its answer.
async fn dial(
    state: &State,
    addr: &str,
    request: &StreamRequest,
) -> Result<relay::AgentStream, String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("reaching the agent at {addr}: {e}"))?;
    let tls = state
        .agents
        .connect(crate::tls::agent_server_name(), tcp)
        .await
        .map_err(|e| format!("TLS with the agent at {addr}: {e}"))?;
    let mut conn = tokio::io::BufReader::new(tls);
    let mut line = serde_json::to_vec(request).expect("serialisable");
    line.push(b'\n');
    conn.write_all(&line).await.map_err(|e| e.to_string())?;
    conn.flush().await.map_err(|e| e.to_string())?;
    let mut answer = Vec::new();
    (&mut conn)
        .take(MAX_HANDSHAKE as u64)
        .read_until(b'\n', &mut answer)
        .await
        .map_err(|e| e.to_string())?;
    let reply: StreamReply = serde_json::from_slice(&answer)
        .map_err(|e| format!("the agent at {addr} answered oddly: {e}"))?;
    match reply.error {
        Some(e) => Err(e),
        None => Ok(conn),
    }
}
