//! VirtualMachineImages on this node: downloaded once, verified before use, cached by
//! checksum; host paths confined to the image root.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::StreamExt;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::sync::Mutex;

use super::render::LocalImage;
use crate::api::image::{ImageFormat, VirtualMachineImageSpec};

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("download of {url} failed: {reason}")]
    Download { url: String, reason: String },
    #[error("checksum mismatch for {url}: got sha256 {got}, want {want}")]
    Checksum {
        url: String,
        got: String,
        want: String,
    },
    #[error("hostPath {path} does not exist or cannot be read: {reason}")]
    Missing { path: String, reason: String },
    #[error("hostPath {path} resolves to {resolved}, outside the image root {root}")]
    OutsideRoot {
        path: String,
        resolved: String,
        root: String,
    },
    #[error("hostPath {0} is not a regular file")]
    NotAFile(String),
    #[error("image {0} has a backing file ({1}): base images must be self-contained")]
    BackingFile(String, String),
    #[error("image {path} is {actual}, but the VirtualMachineImage says {declared}")]
    WrongFormat {
        path: String,
        actual: String,
        declared: String,
    },
    #[error("cannot inspect image {0}: {1}")]
    Inspect(String, String),
    #[error(transparent)]
    Tool(#[from] super::tools::ToolError),
    #[error("I/O error in the image cache: {0}")]
    Io(#[from] std::io::Error),
}

impl ImageError {
    /// Whether trying again may work without a change to the VirtualMachineImage: the
    /// network, a file the admin has yet to copy, a package to install, the node's disk.
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            ImageError::Download { .. }
                | ImageError::Missing { .. }
                | ImageError::Tool(_)
                | ImageError::Inspect(..)
                | ImageError::Io(_)
        )
    }

    /// A condition reason for this failure.
    pub fn reason(&self) -> &'static str {
        match self {
            ImageError::Download { .. } => "ImageDownloadFailed",
            ImageError::Checksum { .. } => "ImageChecksumMismatch",
            ImageError::Missing { .. } => "ImageNotFound",
            ImageError::OutsideRoot { .. } | ImageError::NotAFile(_) => "ImagePathRefused",
            ImageError::BackingFile(..) => "ImageHasBackingFile",
            ImageError::WrongFormat { .. } => "ImageFormatMismatch",
            ImageError::Tool(super::tools::ToolError::Missing(_)) => "ToolMissing",
            ImageError::Inspect(..) | ImageError::Io(_) | ImageError::Tool(_) => "ImageError",
        }
    }
}

pub struct ImageCache {
    cache_dir: PathBuf,
    image_root: PathBuf,
    http: reqwest::Client,
    /// One lock per checksum: concurrent VMs share one download.
    locks: Mutex<HashMap<String, Arc<Mutex<()>>>>,
}

impl ImageCache {
    pub fn new(state_dir: &Path, image_root: PathBuf) -> Self {
        ImageCache {
            cache_dir: state_dir.join("images"),
            image_root,
            http: reqwest::Client::builder()
                .connect_timeout(std::time::Duration::from_secs(10))
                .build()
                .expect("http client"),
            locks: Mutex::default(),
        }
    }

    /// The local, verified file for an image; fetches it on first use.
    pub async fn ensure(&self, spec: &VirtualMachineImageSpec) -> Result<LocalImage, ImageError> {
        let path = if let Some(http) = &spec.source.http {
            self.fetch(&http.url, &http.sha256).await?
        } else if let Some(hp) = &spec.source.host_path {
            self.confine(&hp.path)?
        } else {
            return Err(ImageError::Missing {
                path: String::new(),
                reason: "no source".into(),
            });
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

    /// Resolves symlinks and refuses anything outside the image root.
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
        if !std::fs::metadata(&resolved)?.is_file() {
            return Err(ImageError::NotAFile(path.to_string()));
        }
        Ok(resolved)
    }

    async fn fetch(&self, url: &str, sha256: &str) -> Result<PathBuf, ImageError> {
        let final_path = self.cache_dir.join(format!("sha256-{sha256}"));
        let lock = self
            .locks
            .lock()
            .await
            .entry(sha256.to_string())
            .or_default()
            .clone();
        let _guard = lock.lock().await;
        // Only verified downloads are ever renamed to their final name.
        if tokio::fs::metadata(&final_path).await.is_ok() {
            return Ok(final_path);
        }
        tokio::fs::create_dir_all(&self.cache_dir).await?;
        let partial = self.cache_dir.join(format!("sha256-{sha256}.partial"));
        let fail = |reason: String| ImageError::Download {
            url: url.to_string(),
            reason,
        };
        let resp = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| fail(e.to_string()))?;
        if !resp.status().is_success() {
            return Err(fail(format!("HTTP {}", resp.status())));
        }
        let mut file = tokio::fs::File::create(&partial).await?;
        let mut hasher = Sha256::new();
        let mut body = resp.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| fail(e.to_string()))?;
            hasher.update(&chunk);
            file.write_all(&chunk).await?;
        }
        file.sync_all().await?;
        drop(file);
        let got = hex::encode(hasher.finalize());
        if got != sha256 {
            let _ = tokio::fs::remove_file(&partial).await;
            return Err(ImageError::Checksum {
                url: url.to_string(),
                got,
                want: sha256.to_string(),
            });
        }
        tokio::fs::rename(&partial, &final_path).await?;
        tracing::info!(url, path = %final_path.display(), "image cached");
        Ok(final_path)
    }
}

/// Refuses base images that carry a backing file (they could point anywhere on the host)
/// or whose real format differs from the declared one.
async fn check_base_image(path: &Path, format: &str) -> Result<(), ImageError> {
    let out = super::tools::QEMU_IMG
        .output([
            std::ffi::OsStr::new("info"),
            "--output=json".as_ref(),
            "-U".as_ref(),
            path.as_os_str(),
        ])
        .await?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
        return Err(ImageError::Inspect(path.display().to_string(), err));
    }
    let info: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| ImageError::Inspect(path.display().to_string(), e.to_string()))?;
    let actual = info
        .get("format")
        .and_then(|f| f.as_str())
        .unwrap_or("unknown");
    if actual != format {
        return Err(ImageError::WrongFormat {
            path: path.display().to_string(),
            actual: actual.to_string(),
            declared: format.to_string(),
        });
    }
    if let Some(backing) = info.get("backing-filename").and_then(|b| b.as_str()) {
        return Err(ImageError::BackingFile(
            path.display().to_string(),
            backing.to_string(),
        ));
    }
    Ok(())
}
