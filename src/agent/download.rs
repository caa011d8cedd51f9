//! Image downloads a tenant names, made safe for the node: the addresses they may reach
//! (checked when a name is resolved, for the connection that uses it, and again at every
//! redirect), how much they may write, how long they may take. What a refused or failed
//! download tells the VM's status is a fixed phrase: never bytes, hashes or error texts of
//! whatever answered.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use ipnet::IpNet;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

/// What downloads may reach and take (agent flags; chart values `images.*`).
#[derive(clap::Args, Debug, Clone)]
pub struct DownloadPolicy {
    /// Address ranges image downloads may reach although they are refused by default
    /// (loopback, link-local, private and shared ranges, this node's own addresses),
    /// e.g. 10.0.5.0/24 for an internal mirror. Comma-separated CIDRs.
    #[arg(
        long = "image-source-allow",
        env = "VMLET_IMAGE_SOURCE_ALLOW",
        value_delimiter = ','
    )]
    pub allow: Vec<IpNet>,
    /// The largest image a download may write, in bytes.
    #[arg(long = "image-max-bytes", env = "VMLET_IMAGE_MAX_BYTES", default_value_t = DEFAULT_MAX_BYTES)]
    pub max_bytes: u64,
    /// A download still running after this many seconds fails (and is retried later).
    #[arg(long = "image-download-timeout-seconds", default_value_t = 3600)]
    pub total_timeout_seconds: u64,
    /// A download that receives nothing for this many seconds fails.
    #[arg(long = "image-download-idle-seconds", default_value_t = 60)]
    pub idle_timeout_seconds: u64,
}

/// 64 GiB: larger than any cloud image, small enough that one VM cannot fill a node.
pub const DEFAULT_MAX_BYTES: u64 = 64 << 30;

impl Default for DownloadPolicy {
    fn default() -> Self {
        DownloadPolicy {
            allow: Vec::new(),
            max_bytes: DEFAULT_MAX_BYTES,
            total_timeout_seconds: 3600,
            idle_timeout_seconds: 60,
        }
    }
}

impl DownloadPolicy {
    /// The default policy with loopback allowed: the demo and the tests serve images
    /// from 127.0.0.1.
    pub fn allowing_loopback() -> Self {
        DownloadPolicy {
            allow: vec!["127.0.0.0/8".parse().expect("a CIDR")],
            ..Default::default()
        }
    }
}

/// Why an address is refused by default, or None when it may be reached. Pure: `own` are
/// this node's addresses, `allow` the admin's exceptions (which win).
pub fn refused(ip: IpAddr, allow: &[IpNet], own: &[IpAddr]) -> Option<&'static str> {
    // An IPv4 address written as IPv6 is the IPv4 address.
    let ip = match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    };
    if allow.iter().any(|n| n.contains(&ip)) {
        return None;
    }
    let net = |s: &str| s.parse::<IpNet>().expect("a CIDR").contains(&ip);
    if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_unspecified() || ip.is_multicast() || net("255.255.255.255/32") {
        Some("not a unicast address")
    } else if net("169.254.0.0/16") || net("fe80::/10") {
        Some("link-local (metadata services)")
    } else if net("10.0.0.0/8")
        || net("172.16.0.0/12")
        || net("192.168.0.0/16")
        || net("100.64.0.0/10")
        || net("fc00::/7")
        || net("0.0.0.0/8")
    {
        Some("private (cluster and node networks)")
    } else if own.contains(&ip) {
        Some("this node's own address")
    } else {
        None
    }
}

/// A download's failure as the VM's status may tell it, with the detail for the agent's
/// log only.
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    #[error(
        "source refused by policy (the agent's --image-source-allow lists the private addresses downloads may reach)"
    )]
    Refused { detail: String },
    #[error("download timed out")]
    TimedOut { detail: String },
    #[error("the image is larger than this node's limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("the server answered HTTP {0}")]
    Status(u16),
    #[error(
        "checksum mismatch: the file downloaded is not the one the VirtualMachineImage's sha256 names"
    )]
    Checksum,
    #[error("download failed")]
    Failed { detail: String },
    #[error("the node could not store the download")]
    Io(#[from] std::io::Error),
}

impl DownloadError {
    /// What the agent's log says: the phrase and, for the admin, what really happened.
    pub fn detail(&self) -> String {
        match self {
            DownloadError::Refused { detail }
            | DownloadError::TimedOut { detail }
            | DownloadError::Failed { detail } => format!("{self}: {detail}"),
            DownloadError::Io(e) => format!("{self}: {e}"),
            other => other.to_string(),
        }
    }

    /// Whether it fails the same way every time until the VirtualMachineImage changes.
    pub fn permanent(&self) -> bool {
        matches!(
            self,
            DownloadError::Checksum
                | DownloadError::TooLarge { .. }
                | DownloadError::Refused { .. }
        )
    }
}

/// The refusal, carried through reqwest's error chain from the resolver or the redirect
/// policy.
#[derive(Debug, thiserror::Error)]
#[error("{host} ({ip}) is {why}")]
struct Refusal {
    host: String,
    ip: IpAddr,
    why: &'static str,
}

struct Rules {
    allow: Vec<IpNet>,
    own: Vec<IpAddr>,
}

impl Rules {
    fn check(&self, host: &str, ip: IpAddr) -> Result<(), Refusal> {
        match refused(ip, &self.allow, &self.own) {
            Some(why) => Err(Refusal {
                host: host.to_string(),
                ip,
                why,
            }),
            None => Ok(()),
        }
    }

    /// A URL whose host is an address literal never reaches the resolver.
    fn check_literal(&self, url: &reqwest::Url) -> Result<(), Refusal> {
        let host = url.host_str().unwrap_or_default();
        match host.trim_start_matches('[').trim_end_matches(']').parse() {
            Ok(ip) => self.check(host, ip),
            Err(_) => Ok(()),
        }
    }
}

/// Resolves a name and keeps only the addresses the policy allows: the connection can
/// only use what was checked (no second lookup to rebind).
struct GuardedResolver(Arc<Rules>);

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let rules = self.0.clone();
        Box::pin(async move {
            let host = name.as_str().to_string();
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut first_refusal = None;
            let ok: Vec<SocketAddr> = found
                .into_iter()
                .filter(|a| match rules.check(&host, a.ip()) {
                    Ok(()) => true,
                    Err(r) => {
                        first_refusal.get_or_insert(r);
                        false
                    }
                })
                .collect();
            if ok.is_empty() {
                let err: Box<dyn std::error::Error + Send + Sync> = match first_refusal {
                    Some(r) => Box::new(r),
                    None => format!("{host} has no address").into(),
                };
                return Err(err);
            }
            Ok(Box::new(ok.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

pub struct Downloader {
    http: reqwest::Client,
    rules: Arc<Rules>,
    pub policy: DownloadPolicy,
}

impl Downloader {
    pub fn new(policy: DownloadPolicy) -> Self {
        let own = if_addrs::get_if_addrs()
            .map(|v| v.into_iter().map(|i| i.ip()).collect())
            .unwrap_or_default();
        Self::with_own_addresses(policy, own)
    }

    pub fn with_own_addresses(policy: DownloadPolicy, own: Vec<IpAddr>) -> Self {
        let rules = Arc::new(Rules {
            allow: policy.allow.clone(),
            own,
        });
        let redirect_rules = rules.clone();
        let http = reqwest::Client::builder()
            // A proxy would resolve the names itself: the checks must see every address.
            .no_proxy()
            .dns_resolver(Arc::new(GuardedResolver(rules.clone())))
            .redirect(reqwest::redirect::Policy::custom(move |attempt| {
                if attempt.previous().len() >= 5 {
                    return attempt.error("more than 5 redirects");
                }
                match redirect_rules.check_literal(attempt.url()) {
                    Ok(()) => attempt.follow(),
                    Err(r) => attempt.error(r),
                }
            }))
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(Duration::from_secs(policy.idle_timeout_seconds))
            .timeout(Duration::from_secs(policy.total_timeout_seconds))
            .build()
            .expect("http client");
        Downloader {
            http,
            rules,
            policy,
        }
    }

    /// Downloads `url` into `dest` if its sha256 is `sha256`, counting the bytes received
    /// in `progress`. The file appears under its name only once verified; a `.partial`
    /// beside it never outlives a failure.
    pub async fn fetch(
        &self,
        url: &str,
        sha256: &str,
        dest: &Path,
        progress: &std::sync::atomic::AtomicU64,
    ) -> Result<(), DownloadError> {
        let partial = Partial(dest.with_extension("partial"));
        let res = self.fetch_into(url, sha256, &partial.0, progress).await;
        if res.is_ok() {
            // Root's alone; libvirt lends it to QEMU's user while a domain uses it.
            super::disks::private_file(&partial.0).await?;
            tokio::fs::rename(&partial.0, dest).await?;
        }
        res
    }

    async fn fetch_into(
        &self,
        url: &str,
        sha256: &str,
        partial: &Path,
        progress: &std::sync::atomic::AtomicU64,
    ) -> Result<(), DownloadError> {
        let parsed = reqwest::Url::parse(url).map_err(|e| DownloadError::Failed {
            detail: e.to_string(),
        })?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(DownloadError::Refused {
                detail: format!("scheme {}", parsed.scheme()),
            });
        }
        self.rules
            .check_literal(&parsed)
            .map_err(|r| DownloadError::Refused {
                detail: r.to_string(),
            })?;
        let resp = self.http.get(parsed).send().await.map_err(classify)?;
        if !resp.status().is_success() {
            return Err(DownloadError::Status(resp.status().as_u16()));
        }
        let limit = self.policy.max_bytes;
        if resp.content_length().is_some_and(|n| n > limit) {
            return Err(DownloadError::TooLarge { limit });
        }
        let mut file = tokio::fs::File::create(partial).await?;
        let mut hasher = Sha256::new();
        let mut written = 0u64;
        let mut body = resp.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(classify)?;
            written += chunk.len() as u64;
            progress.store(written, std::sync::atomic::Ordering::Relaxed);
            if written > limit {
                return Err(DownloadError::TooLarge { limit });
            }
            hasher.update(&chunk);
            file.write_all(&chunk).await?;
        }
        file.sync_all().await?;
        if hex::encode(hasher.finalize()) != sha256 {
            return Err(DownloadError::Checksum);
        }
        Ok(())
    }
}

/// A download's temporary file: removed when dropped unless it was renamed away (on
/// failure, on cancellation, when the task is aborted).
struct Partial(PathBuf);

impl Drop for Partial {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Sorts reqwest's errors into what the status may say; the text stays in the detail.
fn classify(e: reqwest::Error) -> DownloadError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(s) = source {
        if let Some(r) = s.downcast_ref::<Refusal>() {
            return DownloadError::Refused {
                detail: r.to_string(),
            };
        }
        source = s.source();
    }
    let detail = format!("{e:#}");
    if e.is_timeout() {
        DownloadError::TimedOut { detail }
    } else {
        DownloadError::Failed { detail }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_table() {
        let own: Vec<IpAddr> = vec!["203.0.113.7".parse().unwrap()];
        let allow: Vec<IpNet> = vec!["10.0.5.0/24".parse().unwrap()];
        // (address, refused?)
        for (ip, refuse) in [
            ("127.0.0.1", true),
            ("127.9.9.9", true),
            ("::1", true),
            ("0.0.0.0", true),
            ("169.254.169.254", true),
            ("fe80::1", true),
            ("10.96.0.1", true),
            ("172.17.0.1", true),
            ("192.168.1.1", true),
            ("100.64.0.1", true),
            ("fd00::1", true),
            ("224.0.0.1", true),
            ("255.255.255.255", true),
            ("::ffff:127.0.0.1", true),
            ("::ffff:169.254.169.254", true),
            ("203.0.113.7", true),
            ("10.0.5.9", false),
            ("198.51.100.1", false),
            ("2001:db8::1", false),
        ] {
            let got = refused(ip.parse().unwrap(), &allow, &own);
            assert_eq!(got.is_some(), refuse, "{ip}: {got:?}");
        }
        // The allow list wins, even over loopback.
        let lo: Vec<IpNet> = vec!["127.0.0.1/32".parse().unwrap()];
        assert_eq!(refused("127.0.0.1".parse().unwrap(), &lo, &[]), None);
    }

    #[test]
    fn status_phrases_carry_no_detail() {
        let secret = "ami-id i-123 root:x:0:0";
        for e in [
            DownloadError::Refused {
                detail: secret.into(),
            },
            DownloadError::TimedOut {
                detail: secret.into(),
            },
            DownloadError::Failed {
                detail: secret.into(),
            },
        ] {
            assert!(!e.to_string().contains(secret), "{e}");
            assert!(e.detail().contains(secret));
        }
        // The phrase is fixed: no computed hash can be in it.
        let msg = DownloadError::Checksum.to_string();
        assert!(
            !msg.split(|c: char| !c.is_ascii_hexdigit())
                .any(|w| w.len() >= 16),
            "{msg}"
        );
    }
}
