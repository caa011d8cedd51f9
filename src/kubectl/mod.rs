//! The `kubectl vm` plugin: start, stop, restart, console, nodes, drain, completion.

mod drain;
pub mod stream;

use clap::{CommandFactory, Parser, Subcommand};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde_json::json;

use crate::api::quantity::{Bytes, parse_bytes};
use crate::api::vm::RunStrategy;
use crate::api::{Hypervisor, VirtualMachine, conditions};

const FIELD_MANAGER: &str = "kubectl-vm";
use crate::api::{POWER_ANNOTATION, RESTART_ANNOTATION};

/// Manage vmlet virtual machines.
#[derive(Parser)]
#[command(name = "kubectl-vm", bin_name = "kubectl vm", version, about)]
pub struct Cli {
    /// Namespace of the VM (default: the kubeconfig context's namespace, else "default").
    #[arg(short, long, global = true)]
    namespace: Option<String>,
    /// Path to the kubeconfig file (default: $KUBECONFIG, then ~/.kube/config, then in-cluster).
    #[arg(long, global = true)]
    kubeconfig: Option<std::path::PathBuf>,
    /// The kubeconfig context to use.
    #[arg(long, global = true)]
    context: Option<String>,
    /// Bearer token for the API server, instead of the kubeconfig user's credentials
    /// (as kubectl's --token).
    #[arg(long, global = true, hide_env_values = true)]
    token: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start a stopped VM (runStrategy Halted becomes Always; Manual VMs are powered on).
    Start { name: String },
    /// Stop a VM (runStrategy becomes Halted; Manual VMs are powered off).
    Stop { name: String },
    /// Stop and start a running VM once (graceful shutdown first).
    Restart { name: String },
    /// Open a VM's serial console: interactive at a terminal (Ctrl+] leaves); otherwise
    /// stdin is typed into it and its output printed until it is quiet after stdin ends.
    Console {
        name: String,
        /// When stdin is not a terminal: how long the console must be quiet after stdin
        /// ends before the command returns, e.g. 2s.
        #[arg(long, default_value = "1s", value_parser = parse_duration)]
        idle: std::time::Duration,
    },
    /// Forward a local port to a VM's VNC display (spec.graphics), and open a viewer
    /// when one is on PATH (remote-viewer, vncviewer, gvncviewer).
    Vnc {
        name: String,
        /// The local port (0: any free one); it listens on 127.0.0.1 only.
        #[arg(long, default_value = "0")]
        port: u16,
        /// Only print the address; launch no viewer.
        #[arg(long)]
        no_launch: bool,
    },
    /// A capacity table of the hypervisors.
    Nodes,
    /// Cordon a node and move its VMs off it as each one's evictionStrategy says
    /// (LiveMigrate, the default: live migration; Shutdown: stop here, start elsewhere;
    /// None: left running there).
    Drain {
        node: String,
        /// Give up after this many seconds.
        #[arg(long, default_value = "600")]
        timeout: u64,
    },
    /// Print a shell completion script.
    Completion { shell: clap_complete::Shell },
}

struct Session {
    client: kube::Client,
    namespace: String,
}

async fn session(cli: &Cli) -> anyhow::Result<Session> {
    let options = KubeConfigOptions {
        context: cli.context.clone(),
        ..Default::default()
    };
    let mut config = match &cli.kubeconfig {
        Some(path) => {
            kube::Config::from_custom_kubeconfig(Kubeconfig::read_from(path)?, &options).await?
        }
        None => match Kubeconfig::read() {
            Ok(kc) => kube::Config::from_custom_kubeconfig(kc, &options).await?,
            Err(_) => kube::Config::infer().await?,
        },
    };
    if let Some(token) = &cli.token {
        config.auth_info = kube::config::AuthInfo {
            token: Some(token.clone().into()),
            ..Default::default()
        };
    }
    let namespace = cli
        .namespace
        .clone()
        .unwrap_or_else(|| config.default_namespace.clone());
    Ok(Session {
        client: kube::Client::try_from(config)?,
        namespace,
    })
}

/// A duration such as 500ms, 2s or 1m.
fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s}: expected e.g. 500ms, 2s or 1m"))?;
    match unit {
        "ms" => Ok(std::time::Duration::from_millis(n)),
        "s" | "" => Ok(std::time::Duration::from_secs(n)),
        "m" => Ok(std::time::Duration::from_secs(n * 60)),
        _ => Err(format!("{s}: expected e.g. 500ms, 2s or 1m")),
    }
}

async fn patch_vm(s: &Session, name: &str, patch: serde_json::Value) -> anyhow::Result<()> {
    let api: Api<VirtualMachine> = Api::namespaced(s.client.clone(), &s.namespace);
    let pp = PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    };
    api.patch(name, &pp, &Patch::Merge(&patch)).await?;
    Ok(())
}

async fn get_vm(s: &Session, name: &str) -> anyhow::Result<VirtualMachine> {
    let api: Api<VirtualMachine> = Api::namespaced(s.client.clone(), &s.namespace);
    api.get_opt(name)
        .await?
        .ok_or_else(|| anyhow::anyhow!("VirtualMachine {}/{name} not found", s.namespace))
}

async fn start(s: &Session, name: &str) -> anyhow::Result<String> {
    let vm = get_vm(s, name).await?;
    match vm.spec.run_strategy.unwrap_or_default() {
        RunStrategy::Halted => {
            patch_vm(s, name, json!({"spec": {"runStrategy": "Always"}})).await?
        }
        RunStrategy::Manual => {
            patch_vm(
                s,
                name,
                json!({"metadata": {"annotations": {POWER_ANNOTATION: "on"}}}),
            )
            .await?
        }
        other => {
            anyhow::bail!("{name} already runs by itself (runStrategy {other:?}); use restart")
        }
    }
    Ok(format!("{name} starting"))
}

async fn stop(s: &Session, name: &str) -> anyhow::Result<String> {
    let vm = get_vm(s, name).await?;
    match vm.spec.run_strategy.unwrap_or_default() {
        RunStrategy::Halted => anyhow::bail!("{name} is already stopped (runStrategy Halted)"),
        RunStrategy::Manual => {
            patch_vm(
                s,
                name,
                json!({"metadata": {"annotations": {POWER_ANNOTATION: "off"}}}),
            )
            .await?
        }
        _ => patch_vm(s, name, json!({"spec": {"runStrategy": "Halted"}})).await?,
    }
    Ok(format!("{name} stopping"))
}

async fn restart(s: &Session, name: &str) -> anyhow::Result<String> {
    let vm = get_vm(s, name).await?;
    if vm.spec.run_strategy == Some(RunStrategy::Halted) {
        anyhow::bail!("{name} is stopped (runStrategy Halted); use start");
    }
    let token = Timestamp::now().to_string();
    patch_vm(
        s,
        name,
        json!({"metadata": {"annotations": {RESTART_ANNOTATION: token}}}),
    )
    .await?;
    Ok(format!("{name} restarting"))
}

async fn nodes(s: &Session) -> anyhow::Result<String> {
    let mut hvs = Api::<Hypervisor>::all(s.client.clone())
        .list(&Default::default())
        .await?
        .items;
    hvs.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    let mut rows = vec![
        ["NAME", "READY", "ACCEL", "VMS", "CPU", "MEMORY", "MEM%"]
            .map(String::from)
            .to_vec(),
    ];
    for h in hvs {
        let st = h.status.unwrap_or_default();
        let (alloc, cap) = (
            st.allocated.unwrap_or_default(),
            st.allocatable.unwrap_or_default(),
        );
        let pct = match (parse_bytes(&alloc.memory), parse_bytes(&cap.memory)) {
            (Ok(a), Ok(c)) if c > 0 => format!("{}%", a * 100 / c),
            _ => "-".into(),
        };
        let mem = |m: &str| {
            parse_bytes(m)
                .map(|b| Bytes(b & !((1 << 20) - 1)).to_string())
                .unwrap_or_else(|_| "-".into())
        };
        rows.push(vec![
            h.metadata.name.unwrap_or_default(),
            if conditions::is_true(&st.conditions, conditions::Type::Ready) {
                "True"
            } else {
                "False"
            }
            .into(),
            st.accel.unwrap_or_else(|| "-".into()),
            st.vms.unwrap_or(0).to_string(),
            format!("{}/{}", alloc.cpu, cap.cpu),
            format!("{}/{}", mem(&alloc.memory), mem(&cap.memory)),
            pct,
        ]);
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    Ok(rows
        .iter()
        .map(|r| {
            r.iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect::<Vec<_>>()
                .join("   ")
                .trim_end()
                .to_string()
        })
        .collect::<Vec<_>>()
        .join("\n"))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Command::Completion { shell } = &cli.command {
        clap_complete::generate(
            *shell,
            &mut Cli::command(),
            "kubectl-vm",
            &mut std::io::stdout(),
        );
        return Ok(());
    }
    let s = session(&cli).await?;
    let out = match cli.command {
        Command::Start { name } => start(&s, &name).await?,
        Command::Stop { name } => stop(&s, &name).await?,
        Command::Restart { name } => restart(&s, &name).await?,
        Command::Console { name, idle } => {
            return stream::console(&s.client, &s.namespace, &name, idle).await;
        }
        Command::Vnc {
            name,
            port,
            no_launch,
        } => return stream::vnc(&s.client, &s.namespace, &name, port, !no_launch).await,
        Command::Nodes => nodes(&s).await?,
        Command::Drain { node, timeout } => {
            drain::drain(&s.client, &node, std::time::Duration::from_secs(timeout)).await?
        }
        Command::Completion { .. } => unreachable!("handled above"),
    };
    println!("{out}");
    Ok(())
}

pub fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
