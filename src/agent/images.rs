//! VirtualMachineImages on this node: downloaded once per namespace in the background,
//! verified before use, cached by checksum; host paths confined to the image root; every
//! image inspected (under limits) before QEMU opens it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::download::{DownloadError, DownloadPolicy, Downloader};
use super::render::LocalImage;
use crate::api::image::{ImageFormat, VirtualMachineImage, VirtualMachineImageSpec};

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The phrase only: what answered the URL is not the tenant's to read.
    #[error("download of {url}: {error}")]
    Download {
        url: String,
        error: Arc<DownloadError>,
    },
    /// Started, or under way, in the background: the VM waits, nothing blocks.
    #[error("downloading {0}")]
    Downloading(String),
    #[error("hostPath {path} does not exist or cannot be read: {reason}")]
    Missing { path: String, reason: String },
    #[error("hostPath {path} resolves to {resolved}, outside the image root {root}")]
    OutsideRoot {
        path: String,
        resolved: String,
        root: String,
    },
    #[error("hostPath {0} lies among the agent's own files (VM disks, downloaded images)")]
    InStateDir(String),
    #[error("hostPath {0} is not a regular file")]
    NotAFile(String),
    #[error("image {0} has a backing file ({1}): base images must be self-contained")]
    BackingFile(String, String),
    #[error(
        "image {0} keeps its data in an external file ({1}): base images must be self-contained"
    )]
    DataFile(String, String),
    #[error("image {path} is {actual}, but the VirtualMachineImage says {declared}")]
    WrongFormat {
        path: String,
        actual: String,
        declared: String,
    },
    #[error("cannot inspect image {0}: {1}")]
    Inspect(String, String),
    /// A published image whose copy is not made yet (its agent is on it).
    #[error("not published yet: {0}")]
    NotPublished(String),
    /// A published image kept in another node's local storage, or a pool this node lacks.
    #[error("its copy is kept {0}, not on this node")]
    Elsewhere(String),
    #[error(transparent)]
    Tool(#[from] super::tools::ToolError),
    #[error("I/O error in the image cache: {0}")]
    Io(#[from] std::io::Error),
}

impl ImageError {
    /// Whether trying again may work without a change to the VirtualMachineImage: the
    /// network, a file the admin has yet to copy, a package to install, the node's disk.
    pub fn retryable(&self) -> bool {
        match self {
            ImageError::Download { error, .. } => !error.permanent(),
            ImageError::Downloading(_)
            | ImageError::Missing { .. }
            | ImageError::Tool(_)
            | ImageError::Inspect(..)
            | ImageError::NotPublished(_)
            | ImageError::Elsewhere(_)
            | ImageError::Io(_) => true,
            _ => false,
        }
    }

    /// A condition reason for this failure.
    pub fn reason(&self) -> &'static str {
        match self {
            ImageError::Download { error, .. } => match **error {
                DownloadError::Checksum => "ImageChecksumMismatch",
                DownloadError::Refused { .. } => "ImageSourceRefused",
                DownloadError::TooLarge { .. } => "ImageTooLarge",
                _ => "ImageDownloadFailed",
            },
            ImageError::Downloading(_) => "ImageDownloading",
            ImageError::Missing { .. } => "ImageNotFound",
            ImageError::OutsideRoot { .. }
            | ImageError::NotAFile(_)
            | ImageError::InStateDir(_) => "ImagePathRefused",
            ImageError::BackingFile(..) => "ImageHasBackingFile",
            ImageError::DataFile(..) => "ImageHasDataFile",
            ImageError::WrongFormat { .. } => "ImageFormatMismatch",
            ImageError::NotPublished(_) => "ImageNotPublished",
            ImageError::Elsewhere(_) => "ImageElsewhere",
            ImageError::Tool(super::tools::ToolError::Missing(_)) => "ToolMissing",
            ImageError::Inspect(..) | ImageError::Io(_) | ImageError::Tool(_) => "ImageError",
        }
    }
}

/// (namespace, sha256, url).
type FetchKey = (String, String, String);

/// A download's place in its life: running, or failed and waiting for its next try.
enum Fetch {
    /// Notified when the task ends; the bytes received so far.
    Running(
        tokio::task::JoinHandle<()>,
        Arc<tokio::sync::Notify>,
        Arc<std::sync::atomic::AtomicU64>,
    ),
    Failed {
        error: Arc<DownloadError>,
        attempts: u32,
        retry_at: Instant,
    },
}

/// How long a reconcile waits for a download under way before it says Downloading.
const DOWNLOAD_WAIT: Duration = Duration::from_secs(3);

/// Backoff after a failed download: 10 s doubling to 10 min.
fn backoff(attempts: u32) -> Duration {
    Duration::from_secs(10)
        .saturating_mul(1 << attempts.saturating_sub(1).min(6))
        .min(Duration::from_secs(600))
}

pub struct ImageCache {
    /// `<state dir>/image-cache/<namespace>/sha256-<hex>`: outside any image root a
    /// hostPath may name, and one directory per namespace (a tenant never boots what
    /// another fetched by knowing its hash).
    cache_dir: PathBuf,
    state_dir: PathBuf,
    /// Where published images' copies are: this node's name, its storage pools.
    node: String,
    pools: std::collections::BTreeMap<String, PathBuf>,
    image_root: PathBuf,
    downloader: Arc<Downloader>,
    /// By (namespace, sha256, url): a slow source never holds up the same image from
    /// another URL, nor any reconcile.
    fetches: Arc<std::sync::Mutex<HashMap<FetchKey, Fetch>>>,
}

impl ImageCache {
    pub fn new(state_dir: &Path, image_root: PathBuf, policy: DownloadPolicy) -> Self {
        ImageCache {
            cache_dir: state_dir.join("image-cache"),
            state_dir: state_dir.to_path_buf(),
            node: String::new(),
            pools: Default::default(),
            image_root,
            downloader: Arc::new(Downloader::new(policy)),
            fetches: Default::default(),
        }
    }

    /// This node's name and storage pools, where published images' copies are.
    pub fn with_storage(
        mut self,
        node: &str,
        pools: std::collections::BTreeMap<String, PathBuf>,
    ) -> Self {
        self.node = node.to_string();
        self.pools = pools;
        self
    }

    /// The local, verified file for an image; starts its download on first use and says
    /// Downloading until it is there.
    pub async fn ensure(&self, img: &VirtualMachineImage) -> Result<LocalImage, ImageError> {
        let spec = &img.spec;
        let ns = img.metadata.namespace.as_deref().unwrap_or_default();
        let path = if let Some(http) = &spec.source.http {
            self.fetch(ns, &http.url, &http.sha256).await?
        } else if let Some(hp) = &spec.source.host_path {
            self.confine(&hp.path)?
        } else {
            self.published(img)?
        };
        let format = match spec.format {
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Raw | ImageFormat::Kernel | ImageFormat::Initrd => "raw",
        };
        if matches!(spec.format, ImageFormat::Qcow2 | ImageFormat::Raw) {
            check_base_image(&path, format).await?;
        }
        Ok(LocalImage { path, format })
    }

    /// The copy of a published image, if this node has it.
    fn published(&self, img: &VirtualMachineImage) -> Result<PathBuf, ImageError> {
        let name = img.metadata.name.clone().unwrap_or_default();
        let Some(p) = img.status.as_ref().and_then(|s| s.published.as_ref()) else {
            return Err(ImageError::NotPublished(name));
        };
        let root =
            match p.pinned_node() {
                Some(n) if n == self.node => self.state_dir.clone(),
                Some(n) => return Err(ImageError::Elsewhere(format!("on node {n}"))),
                None => self.pools.get(&p.storage).cloned().ok_or_else(|| {
                    ImageError::Elsewhere(format!("in storage pool {}", p.storage))
                })?,
            };
        Ok(super::volumes::image_file(
            &root,
            img.metadata.uid.as_deref().unwrap_or_default(),
        ))
    }

    /// The bytes a download of this image in namespace `ns` has received, while it runs.
    pub fn downloaded(&self, ns: &str, spec: &VirtualMachineImageSpec) -> Option<u64> {
        let http = spec.source.http.as_ref()?;
        let key = (ns.to_string(), http.sha256.clone(), http.url.clone());
        match self.fetches.lock().expect("not poisoned").get(&key) {
            Some(Fetch::Running(_, _, progress)) => {
                Some(progress.load(std::sync::atomic::Ordering::Relaxed))
            }
            _ => None,
        }
    }

    /// Resolves symlinks and refuses anything outside the image root, or among the VMs'
    /// files and the download cache (should the root contain them).
    pub fn confine(&self, path: &str) -> Result<PathBuf, ImageError> {
        let root = std::fs::canonicalize(&self.image_root).map_err(|e| ImageError::Missing {
            path: self.image_root.display().to_string(),
            reason: e.to_string(),
        })?;
        let resolved = std::fs::canonicalize(path).map_err(|e| ImageError::Missing {
            path: path.to_string(),
            reason: e.to_string(),
        })?;
        if !resolved.starts_with(&root) {
            return Err(ImageError::OutsideRoot {
                path: path.to_string(),
                resolved: resolved.display().to_string(),
                root: root.display().to_string(),
            });
        }
        // The default image root lies in the state directory; the VMs' own files, the
        // download cache and the tenants' volumes, snapshots and published images beside
        // it are never images: another namespace could name them.
        let private = [
            self.state_dir.join("vms"),
            self.cache_dir.clone(),
            self.state_dir.join("volumes"),
            self.state_dir.join("snapshots"),
            self.state_dir.join("published"),
        ];
        if private
            .iter()
            .filter_map(|d| std::fs::canonicalize(d).ok())
            .any(|d| resolved.starts_with(d))
        {
            return Err(ImageError::InStateDir(path.to_string()));
        }
        if !std::fs::metadata(&resolved)?.is_file() {
            return Err(ImageError::NotAFile(path.to_string()));
        }
        Ok(resolved)
    }

    async fn fetch(&self, ns: &str, url: &str, sha256: &str) -> Result<PathBuf, ImageError> {
        let final_path = self.cache_dir.join(ns).join(format!("sha256-{sha256}"));
        // Only verified downloads are ever renamed to their final name.
        if tokio::fs::metadata(&final_path).await.is_ok() {
            return Ok(final_path);
        }
        let key = (ns.to_string(), sha256.to_string(), url.to_string());
        let done = self.start_or_join(&key, &final_path)?;
        self.await_fetch(done, &key, &final_path).await
    }

    /// The download of `key` under way (started now if there is none, or if its last
    /// failure's backoff has passed); the error of that failure while it has not.
    fn start_or_join(
        &self,
        key: &FetchKey,
        final_path: &Path,
    ) -> Result<Arc<tokio::sync::Notify>, ImageError> {
        // Held while the task is spawned and recorded: it records its own end after.
        let mut fetches = self.fetches.lock().expect("not poisoned");
        let attempts = match fetches.get(key) {
            Some(Fetch::Running(task, done, _)) if !task.is_finished() => return Ok(done.clone()),
            Some(Fetch::Failed {
                error,
                attempts,
                retry_at,
            }) => {
                if Instant::now() < *retry_at {
                    return Err(ImageError::Download {
                        url: key.2.clone(),
                        error: error.clone(),
                    });
                }
                *attempts
            }
            // Finished without a record (it panicked).
            Some(Fetch::Running(..)) | None => 0,
        };
        let downloader = self.downloader.clone();
        let fetches_after = self.fetches.clone();
        let dir = final_path.parent().expect("in a directory").to_path_buf();
        let (url_owned, sha, dest) = (key.2.clone(), key.1.clone(), final_path.to_path_buf());
        let task_key = key.clone();
        let done = Arc::new(tokio::sync::Notify::new());
        let done_task = done.clone();
        let progress = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let progress_task = progress.clone();
        let task = tokio::spawn(async move {
            let res = async {
                super::disks::traversable(&dir).await?;
                downloader
                    .fetch(&url_owned, &sha, &dest, &progress_task)
                    .await
            }
            .await;
            {
                let mut fetches = fetches_after.lock().expect("not poisoned");
                match res {
                    Ok(()) => {
                        tracing::info!(url = %url_owned, path = %dest.display(), "image cached");
                        fetches.remove(&task_key);
                    }
                    Err(e) => {
                        let attempts = attempts + 1;
                        let wait = backoff(attempts);
                        tracing::warn!(url = %url_owned, error = %e.detail(), attempts, retry_in_s = wait.as_secs(), "image download failed");
                        fetches.insert(
                            task_key,
                            Fetch::Failed {
                                error: Arc::new(e),
                                attempts,
                                retry_at: Instant::now() + wait,
                            },
                        );
                    }
                }
            }
            done_task.notify_waiters();
        });
        fetches.insert(key.clone(), Fetch::Running(task, done.clone(), progress));
        Ok(done)
    }

    /// Waits a little for a running download: a small image is there within the same
    /// reconcile; a large or stalled one says Downloading and is looked at again soon.
    async fn await_fetch(
        &self,
        done: Arc<tokio::sync::Notify>,
        key: &FetchKey,
        final_path: &Path,
    ) -> Result<PathBuf, ImageError> {
        let notified = done.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let finished = |fetches: &HashMap<FetchKey, Fetch>| match fetches.get(key) {
            Some(Fetch::Running(task, ..)) => task.is_finished(),
            _ => true,
        };
        if !finished(&self.fetches.lock().expect("not poisoned")) {
            let _ = tokio::time::timeout(DOWNLOAD_WAIT, notified).await;
        }
        if final_path.exists() {
            return Ok(final_path.to_path_buf());
        }
        match self.fetches.lock().expect("not poisoned").get(key) {
            Some(Fetch::Failed { error, .. }) => Err(ImageError::Download {
                url: key.2.clone(),
                error: error.clone(),
            }),
            _ => Err(ImageError::Downloading(key.2.clone())),
        }
    }
}

/// What `qemu-img info` may use on an untrusted image.
const INSPECT_MEMORY: u64 = 1 << 30;
const INSPECT_CPU_SECONDS: u64 = 30;

/// Refuses base images QEMU must not open as given: a real format other than the declared
/// one (a "raw" image with a qcow2 header would be read as qcow2 by anything that probes),
/// a backing file or an external data file (either names a host file QEMU would open for
/// the guest). Inspected by `qemu-img info` under memory and CPU limits.
async fn check_base_image(path: &Path, format: &str) -> Result<(), ImageError> {
    let out = super::tools::QEMU_IMG
        .output_limited(
            [
                std::ffi::OsStr::new("info"),
                "--output=json".as_ref(),
                "-U".as_ref(),
                path.as_os_str(),
            ],
            INSPECT_MEMORY,
            INSPECT_CPU_SECONDS,
        )
        .await?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
        return Err(ImageError::Inspect(path.display().to_string(), err));
    }
    let info: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| ImageError::Inspect(path.display().to_string(), e.to_string()))?;
    inspect_verdict(path, format, &info)
}

/// The decision on `qemu-img info`'s JSON, pure.
fn inspect_verdict(path: &Path, format: &str, info: &serde_json::Value) -> Result<(), ImageError> {
    let shown = || path.display().to_string();
    let actual = info
        .get("format")
        .and_then(|f| f.as_str())
        .unwrap_or("unknown");
    if actual != format {
        return Err(ImageError::WrongFormat {
            path: shown(),
            actual: actual.to_string(),
            declared: format.to_string(),
        });
    }
    if let Some(backing) = info.get("backing-filename").and_then(|b| b.as_str()) {
        return Err(ImageError::BackingFile(shown(), backing.to_string()));
    }
    if let Some(data) = info.pointer("/format-specific/data/data-file") {
        let name = data.as_str().unwrap_or("unnamed").to_string();
        return Err(ImageError::DataFile(shown(), name));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An image root that holds the state directory (or is it) still never yields a
    /// VM's disk, a download, a volume, a snapshot copy or a published image.
    #[test]
    fn the_state_directorys_disks_are_never_images() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let cache = ImageCache::new(&state, dir.path().to_path_buf(), Default::default());
        let private = [
            "vms/u",
            "image-cache/ns",
            "volumes",
            "snapshots/s",
            "published",
        ];
        for sub in private.iter().chain(&["images"]) {
            std::fs::create_dir_all(state.join(sub)).unwrap();
            std::fs::write(state.join(sub).join("disk.qcow2"), b"x").unwrap();
        }
        for sub in private {
            let path = state.join(sub).join("disk.qcow2");
            let got = cache.confine(path.to_str().unwrap());
            assert!(
                matches!(got, Err(ImageError::InStateDir(_))),
                "{sub}: {got:?}"
            );
        }
        let fine = state.join("images").join("disk.qcow2");
        assert!(cache.confine(fine.to_str().unwrap()).is_ok());
    }
}
