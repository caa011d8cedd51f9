//! The Kubernetes client every long-running subcommand builds the same way.

use std::path::PathBuf;

use kube::Client;

/// A client from `kubeconfig` when given, else in-cluster config or $KUBECONFIG.
pub async fn client(kubeconfig: Option<&PathBuf>) -> anyhow::Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?
        }
        None => kube::Config::infer().await?,
    };
    Ok(Client::try_from(config)?)
}
