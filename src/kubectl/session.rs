//! The connection `kubectl vm` makes, from the same flags and files as kubectl's: a
//! kubeconfig that is named (by flag or KUBECONFIG) or present must load, or the command
//! fails; only when there is none at all does it fall back to the Pod's service account.

use std::path::PathBuf;
use std::time::Duration;

use kube::config::{KubeConfigOptions, Kubeconfig};

/// kubectl's connection flags.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct Flags {
    /// Namespace of the VM (default: the kubeconfig context's namespace, else "default").
    #[arg(short, long, global = true)]
    pub namespace: Option<String>,
    /// Path to the kubeconfig file (default: $KUBECONFIG, then ~/.kube/config; in a Pod
    /// with neither, its service account).
    #[arg(long, global = true)]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use.
    #[arg(long, global = true)]
    pub context: Option<String>,
    /// The kubeconfig cluster to use.
    #[arg(long, global = true)]
    pub cluster: Option<String>,
    /// The kubeconfig user to use.
    #[arg(long, global = true)]
    pub user: Option<String>,
    /// Bearer token for the API server, instead of the kubeconfig user's credentials.
    #[arg(long, global = true, hide_env_values = true)]
    pub token: Option<String>,
    /// Act as this user (impersonation).
    #[arg(long = "as", global = true)]
    pub as_user: Option<String>,
    /// Act as a member of this group (impersonation; repeatable).
    #[arg(long = "as-group", global = true)]
    pub as_group: Vec<String>,
    /// How long to wait for one answer from the API server (e.g. 30s, 1m; 0: no limit).
    #[arg(long, global = true, value_parser = super::parse_duration, default_value = "0")]
    pub request_timeout: Duration,
}

/// Where the kubeconfig comes from, decided from the flag, KUBECONFIG and what exists.
#[derive(Debug, PartialEq)]
pub enum Source {
    /// A file the user named: it must load.
    Named(PathBuf),
    /// KUBECONFIG's list: every file in it must load.
    Env,
    /// ~/.kube/config, which exists: it must load.
    Home(PathBuf),
    /// No kubeconfig anywhere: the Pod's service account.
    InCluster,
}

/// Pure: the source from the flag, KUBECONFIG's value and whether ~/.kube/config exists.
pub fn source(flag: Option<&PathBuf>, env: Option<&str>, home: Option<PathBuf>) -> Source {
    if let Some(p) = flag {
        return Source::Named(p.clone());
    }
    if env.is_some_and(|v| v.split(':').any(|p| !p.is_empty())) {
        return Source::Env;
    }
    match home {
        Some(h) if h.exists() => Source::Home(h),
        _ => Source::InCluster,
    }
}

/// The client and namespace the flags ask for.
pub async fn connect(f: &Flags) -> anyhow::Result<(kube::Client, String)> {
    let options = KubeConfigOptions {
        context: f.context.clone(),
        cluster: f.cluster.clone(),
        user: f.user.clone(),
    };
    let home = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".kube/config"));
    let env = std::env::var("KUBECONFIG").ok();
    let from_file = |kc: Kubeconfig| kube::Config::from_custom_kubeconfig(kc, &options);
    let mut config = match source(f.kubeconfig.as_ref(), env.as_deref(), home) {
        Source::Named(p) | Source::Home(p) => {
            let kc = Kubeconfig::read_from(&p)
                .map_err(|e| anyhow::anyhow!("kubeconfig {}: {e}", p.display()))?;
            from_file(kc).await?
        }
        Source::Env => {
            let kc = Kubeconfig::from_env()
                .map_err(|e| anyhow::anyhow!("KUBECONFIG: {e}"))?
                .unwrap_or_default();
            from_file(kc).await?
        }
        Source::InCluster => {
            if f.context.is_some() || f.cluster.is_some() || f.user.is_some() {
                anyhow::bail!(
                    "--context, --cluster and --user name kubeconfig entries, and there is no \
                     kubeconfig (--kubeconfig, KUBECONFIG or ~/.kube/config)"
                );
            }
            kube::Config::incluster().map_err(|e| {
                anyhow::anyhow!(
                    "no kubeconfig (--kubeconfig, KUBECONFIG or ~/.kube/config) and not in a \
                     Pod: {e}"
                )
            })?
        }
    };
    if let Some(token) = &f.token {
        config.auth_info = kube::config::AuthInfo {
            token: Some(token.clone().into()),
            ..Default::default()
        };
    }
    if f.as_user.is_some() {
        config.auth_info.impersonate = f.as_user.clone();
    }
    if !f.as_group.is_empty() {
        config.auth_info.impersonate_groups = Some(f.as_group.clone());
    }
    if !f.request_timeout.is_zero() {
        config.connect_timeout = Some(f.request_timeout);
        config.read_timeout = Some(f.request_timeout);
        config.write_timeout = Some(f.request_timeout);
    }
    let namespace = f
        .namespace
        .clone()
        .unwrap_or_else(|| config.default_namespace.clone());
    Ok((kube::Client::try_from(config)?, namespace))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kubeconfig_comes_from_where_kubectl_takes_it() {
        let dir = tempfile::tempdir().unwrap();
        let present = dir.path().join("config");
        std::fs::write(&present, "").unwrap();
        let absent = dir.path().join("none");
        let flag = PathBuf::from("/x/kc");
        // (flag, KUBECONFIG, ~/.kube/config) -> source
        let table = [
            (
                Some(&flag),
                Some("/y"),
                Some(present.clone()),
                Source::Named(flag.clone()),
            ),
            (None, Some("/y:/z"), Some(present.clone()), Source::Env),
            (
                None,
                Some(""),
                Some(present.clone()),
                Source::Home(present.clone()),
            ),
            (None, Some(":"), None, Source::InCluster),
            (
                None,
                None,
                Some(present.clone()),
                Source::Home(present.clone()),
            ),
            (None, None, Some(absent), Source::InCluster),
        ];
        for (f, env, home, want) in table {
            assert_eq!(source(f, env, home.clone()), want, "{f:?} {env:?} {home:?}");
        }
    }
}
