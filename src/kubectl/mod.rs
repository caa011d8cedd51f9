//! The `kubectl vm` plugin: start, stop, restart, console, nodes, drain, completion.

mod complete;
mod drain;
mod session;
pub mod stream;

use clap::{CommandFactory, Parser, Subcommand};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

use crate::api::migration::{VirtualMachineMigration, VirtualMachineMigrationSpec};
use crate::api::quantity::{Bytes, parse_bytes};
use crate::api::vm::RunStrategy;
use crate::api::{Hypervisor, VirtualMachine, conditions};

const FIELD_MANAGER: &str = "kubectl-vm";
use crate::api::{POWER_ANNOTATION, RESTART_ANNOTATION};

/// Manage vmlet virtual machines.
#[derive(Parser)]
#[command(name = "kubectl-vm", bin_name = "kubectl vm", version, about)]
pub struct Cli {
    #[command(flatten)]
    conn: session::Flags,
    /// Print the objects the command read or wrote, as JSON or YAML, instead of a message
    /// or a table (start, stop, restart, migrate, nodes).
    #[arg(short, long, global = true, value_enum)]
    output: Option<Output>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Output {
    Json,
    Yaml,
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
    /// Move a running VM to another node: live migration, or shutdown and start there,
    /// as its evictionStrategy says. Creates a VirtualMachineMigration.
    Migrate {
        name: String,
        /// The node to move it to (default: the scheduler picks one).
        #[arg(long)]
        to: Option<String>,
    },
    /// A capacity table of the hypervisors.
    Nodes {
        /// First wait up to this long for at least one hypervisor to be Ready (e.g. 5m);
        /// fail if none is.
        #[arg(long, value_parser = parse_duration)]
        wait: Option<std::time::Duration>,
    },
    /// Cordon a node and move its VMs off it as each one's evictionStrategy says
    /// (LiveMigrate, the default: live migration; Shutdown: stop here, start elsewhere;
    /// None: left running there).
    Drain {
        node: String,
        /// Give up after this long (e.g. 10m; a bare number is seconds).
        #[arg(long, default_value = "10m", value_parser = parse_duration)]
        timeout: std::time::Duration,
    },
    /// Print a shell completion script. kubectl (>= 1.26) completes `kubectl vm` by
    /// running `kubectl_complete-vm`, installed beside kubectl-vm.
    Completion { shell: clap_complete::Shell },
}

struct Session {
    client: kube::Client,
    namespace: String,
}

async fn session(cli: &Cli) -> anyhow::Result<Session> {
    let (client, namespace) = session::connect(&cli.conn).await?;
    Ok(Session { client, namespace })
}

/// A duration as kubectl takes them: a sequence of numbers with units h, m, s, ms (1h30m,
/// 90s, 500ms), or a bare number of seconds.
fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let bad = || format!("{s}: expected a duration such as 90s, 5m, 1h30m or 500ms");
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(std::time::Duration::from_secs(secs));
    }
    let mut total = std::time::Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let one = match &rest[..unit] {
            "h" => std::time::Duration::from_secs(3600),
            "m" => std::time::Duration::from_secs(60),
            "s" => std::time::Duration::from_secs(1),
            "ms" => std::time::Duration::from_millis(1),
            _ => return Err(bad()),
        };
        total += one * u32::try_from(n).map_err(|_| bad())?;
        rest = &rest[unit..];
    }
    Ok(total)
}

/// An object or a list of them, as `-o` asks.
fn print_as<T: serde::Serialize>(output: Output, value: &T) -> anyhow::Result<String> {
    Ok(match output {
        Output::Json => serde_json::to_string_pretty(value)?,
        Output::Yaml => serde_saphyr::to_string(value)?.trim_end().to_string(),
    })
}

/// What a command did: the line it prints, and the object it wrote (for `-o`).
struct Done {
    message: String,
    object: serde_json::Value,
}

impl Done {
    fn of<T: serde::Serialize>(message: String, object: &T) -> anyhow::Result<Done> {
        Ok(Done {
            message,
            object: serde_json::to_value(object)?,
        })
    }
}

async fn patch_vm(
    s: &Session,
    name: &str,
    patch: serde_json::Value,
) -> anyhow::Result<VirtualMachine> {
    let api: Api<VirtualMachine> = Api::namespaced(s.client.clone(), &s.namespace);
    let pp = PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    };
    Ok(api.patch(name, &pp, &Patch::Merge(&patch)).await?)
}

async fn get_vm(s: &Session, name: &str) -> anyhow::Result<VirtualMachine> {
    let api: Api<VirtualMachine> = Api::namespaced(s.client.clone(), &s.namespace);
    api.get_opt(name)
        .await?
        .ok_or_else(|| anyhow::anyhow!("VirtualMachine {}/{name} not found", s.namespace))
}

async fn start(s: &Session, name: &str) -> anyhow::Result<Done> {
    let vm = get_vm(s, name).await?;
    let vm = match vm.spec.run_strategy.unwrap_or_default() {
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
    };
    Done::of(format!("{name} starting"), &vm)
}

async fn stop(s: &Session, name: &str) -> anyhow::Result<Done> {
    let vm = get_vm(s, name).await?;
    let vm = match vm.spec.run_strategy.unwrap_or_default() {
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
    };
    Done::of(format!("{name} stopping"), &vm)
}

async fn restart(s: &Session, name: &str) -> anyhow::Result<Done> {
    let vm = get_vm(s, name).await?;
    if vm.spec.run_strategy == Some(RunStrategy::Halted) {
        anyhow::bail!("{name} is stopped (runStrategy Halted); use start");
    }
    let token = Timestamp::now().to_string();
    let vm = patch_vm(
        s,
        name,
        json!({"metadata": {"annotations": {RESTART_ANNOTATION: token}}}),
    )
    .await?;
    Done::of(format!("{name} restarting"), &vm)
}

/// Creates a VirtualMachineMigration for a running VM; the controller admits it (or says
/// why not on the migration and the VM).
async fn migrate(s: &Session, name: &str, to: Option<String>) -> anyhow::Result<Done> {
    let vm = get_vm(s, name).await?;
    let Some(from) = vm.status.as_ref().and_then(|st| st.node_name.clone()) else {
        anyhow::bail!("{name} is not placed on a node: nothing to migrate");
    };
    if to.as_deref() == Some(from.as_str()) {
        anyhow::bail!("{name} already runs on {from}");
    }
    let api: Api<VirtualMachineMigration> = Api::namespaced(s.client.clone(), &s.namespace);
    let mut mig = VirtualMachineMigration::new(
        "",
        VirtualMachineMigrationSpec {
            vm_name: name.to_string(),
            target_node: to.clone(),
        },
    );
    mig.metadata.name = None;
    mig.metadata.generate_name = Some(format!("{name}-"));
    let pp = PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    };
    let made = api.create(&pp, &mig).await?;
    let made_name = made.metadata.name.clone().unwrap_or_default();
    let target = to.map_or_else(
        || "a node the scheduler picks".to_string(),
        |n| n.to_string(),
    );
    Done::of(
        format!(
            "virtualmachinemigration/{made_name} created: {name} from {from} to {target} \
             (kubectl get vmim {made_name} -w)"
        ),
        &made,
    )
}

/// Whether a hypervisor reports Ready.
fn ready(h: &Hypervisor) -> bool {
    h.status
        .as_ref()
        .is_some_and(|st| conditions::is_true(&st.conditions, conditions::Type::Ready))
}

/// The hypervisors by name; with `wait`, once one is Ready (polling, as a `helm test`
/// or a script waits for a cluster to be usable).
async fn hypervisors(
    s: &Session,
    wait: Option<std::time::Duration>,
) -> anyhow::Result<Vec<Hypervisor>> {
    let api = Api::<Hypervisor>::all(s.client.clone());
    let deadline = wait.map(|w| std::time::Instant::now() + w);
    loop {
        let mut hvs = api.list(&Default::default()).await?.items;
        hvs.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        match deadline {
            Some(_) if hvs.iter().any(ready) => return Ok(hvs),
            Some(d) if std::time::Instant::now() >= d => anyhow::bail!(
                "no hypervisor became Ready within {:?} ({} known)",
                wait.unwrap_or_default(),
                hvs.len()
            ),
            Some(_) => tokio::time::sleep(std::time::Duration::from_secs(2)).await,
            None => return Ok(hvs),
        }
    }
}

/// The capacity table.
fn nodes_table(hvs: Vec<Hypervisor>) -> String {
    let mut rows = vec![
        ["NAME", "READY", "ACCEL", "VMS", "CPU", "MEMORY", "MEM%"]
            .map(String::from)
            .to_vec(),
    ];
    for h in hvs {
        let is_ready = ready(&h);
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
            if is_ready { "True" } else { "False" }.into(),
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
    rows.iter()
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
        .join("\n")
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let prints_objects = matches!(
        cli.command,
        Command::Start { .. }
            | Command::Stop { .. }
            | Command::Restart { .. }
            | Command::Migrate { .. }
            | Command::Nodes { .. }
    );
    if cli.output.is_some() && !prints_objects {
        anyhow::bail!("-o applies to start, stop, restart, migrate and nodes");
    }
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
    let done = match cli.command {
        Command::Start { name } => start(&s, &name).await?,
        Command::Stop { name } => stop(&s, &name).await?,
        Command::Restart { name } => restart(&s, &name).await?,
        Command::Migrate { name, to } => migrate(&s, &name, to).await?,
        Command::Console { name, idle } => {
            return stream::console(&s.client, &s.namespace, &name, idle).await;
        }
        Command::Vnc {
            name,
            port,
            no_launch,
        } => return stream::vnc(&s.client, &s.namespace, &name, port, !no_launch).await,
        Command::Nodes { wait } => {
            let hvs = hypervisors(&s, wait).await?;
            let list = json!({"apiVersion": "v1", "kind": "List", "items": &hvs});
            Done {
                message: nodes_table(hvs),
                object: list,
            }
        }
        Command::Drain { node, timeout } => {
            println!("{}", drain::drain(&s.client, &node, timeout).await?);
            return Ok(());
        }
        Command::Completion { .. } => unreachable!("handled above"),
    };
    match cli.output {
        Some(o) => println!("{}", print_as(o, &done.object)?),
        None => println!("{}", done.message),
    }
    Ok(())
}

/// `kubectl_complete-vm WORDS...`: what kubectl (>= 1.26) runs to complete
/// `kubectl vm WORDS...`; the same as `kubectl-vm __complete WORDS...`.
pub fn complete_main() -> std::process::ExitCode {
    complete_words(std::env::args().skip(1).collect())
}

pub fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().collect();
    // Before clap: the words are a partial command line, which clap would refuse.
    if args.get(1).map(String::as_str) == Some("__complete") {
        return complete_words(args[2..].to_vec());
    }
    run_main(Cli::parse())
}

fn complete_words(words: Vec<String>) -> std::process::ExitCode {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return std::process::ExitCode::FAILURE;
    };
    print!("{}", rt.block_on(complete::answer(&Cli::command(), &words)));
    std::process::ExitCode::SUCCESS
}

fn run_main(cli: Cli) -> std::process::ExitCode {
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
