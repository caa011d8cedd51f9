use clap::{Parser, Subcommand};

/// vmlet: run virtual machines as Kubernetes custom resources.
#[derive(Parser)]
#[command(name = "vmlet", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log lines as text or as JSON objects (one per line).
    #[arg(
        long,
        global = true,
        env = "VMLET_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    log_format: vmlet::telemetry::LogFormat,
}

#[derive(Subcommand)]
enum Command {
    /// Print every CustomResourceDefinition as YAML.
    Crd,
    /// Run the node agent: turn the VMs bound to this node into libvirt domains.
    Agent(Box<vmlet::agent::Args>),
    /// Run the controller: place VMs on hypervisors (leader-elected).
    Controller(vmlet::controller::Args),
    /// Serve subresources.vmlet.dev (VM consoles and displays) behind the API server.
    Api(vmlet::subresources::Args),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => {
            for (_, crd) in vmlet::api::crds() {
                print!("{}", vmlet::api::crd_yaml(&crd));
            }
            Ok(())
        }
        Command::Agent(args) => {
            vmlet::telemetry::init(cli.log_format);
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(vmlet::agent::run(*args))
        }
        Command::Controller(args) => {
            vmlet::telemetry::init(cli.log_format);
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(vmlet::controller::run(args))
        }
        Command::Api(args) => {
            vmlet::telemetry::init(cli.log_format);
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(vmlet::subresources::run(args))
        }
    }
}
