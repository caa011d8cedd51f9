//! The files a VM's disks live in: qcow2 overlays on cached bases, blank disks and the
//! cloud-init seed. All inside the VM's own directory, so removing it removes them all
//! and never touches a cached base.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

use super::render::DiskFile;
use super::seed;
use super::volumes::Origin;
use crate::api::vm::Disk;

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error(transparent)]
    Tool(#[from] super::tools::ToolError),
    #[error("qemu-img failed for {path}: {reason}")]
    QemuImg { path: String, reason: String },
    #[error("I/O error preparing disks: {0}")]
    Io(#[from] std::io::Error),
}

/// Runs qemu-img with `args` then `path` then `after`; its output when it succeeded.
async fn run_qemu_img(
    args: &[&str],
    path: &Path,
    after: &[&str],
) -> Result<std::process::Output, DiskError> {
    let out = super::tools::QEMU_IMG
        .output(
            args.iter()
                .map(std::ffi::OsStr::new)
                .chain([path.as_os_str()])
                .chain(after.iter().map(std::ffi::OsStr::new)),
        )
        .await?;
    if !out.status.success() {
        return Err(DiskError::QemuImg {
            path: path.display().to_string(),
            reason: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(out)
}

async fn qemu_img(args: &[&str], path: &Path) -> Result<(), DiskError> {
    run_qemu_img(args, path, &[]).await.map(|_| ())
}

/// Creates what is missing. Existing overlays, blank disks and volumes hold guest data
/// and are never rewritten; the seed is rewritten so that it follows the spec on the
/// next boot. With `offline` (the domain is about to start, so no QEMU has the files
/// open) a volume smaller than its size is grown.
pub async fn prepare(
    vm_dir: &Path,
    files: &[(Disk, DiskFile)],
    uid: &str,
    hostname: &str,
    offline: bool,
) -> Result<(), DiskError> {
    traversable(vm_dir).await?;
    for (disk, file) in files {
        let exists = tokio::fs::metadata(file.path()).await.is_ok();
        match file {
            DiskFile::Volume {
                path, size, origin, ..
            } if !exists => {
                create_volume(path, *size, origin).await?;
            }
            DiskFile::Volume { path, size, .. } if offline => {
                grow(path, *size).await?;
            }
            DiskFile::Overlay {
                path,
                base,
                base_format,
            } if !exists => {
                let base = base.to_string_lossy();
                qemu_img(
                    &[
                        "create",
                        "-q",
                        "-f",
                        "qcow2",
                        "-F",
                        base_format,
                        "-b",
                        &base,
                    ],
                    path,
                )
                .await?;
                private_file(path).await?;
            }
            DiskFile::Blank { path, size } if !exists => {
                qemu_img(
                    &["create", "-q", "-f", "qcow2", "-o", &format!("size={size}")],
                    path,
                )
                .await?;
                private_file(path).await?;
            }
            DiskFile::Seed { path } => {
                let ci = disk.cloud_init.as_ref();
                let files = seed::nocloud_files(
                    uid,
                    hostname,
                    ci.and_then(|c| c.user_data.as_deref()),
                    ci.and_then(|c| c.network_data.as_deref()),
                );
                let tmp = path.with_extension("iso.tmp");
                tokio::fs::write(&tmp, seed::iso9660(&files)).await?;
                private_file(&tmp).await?;
                tokio::fs::rename(&tmp, path).await?;
            }
            _ => {}
        }
    }
    Ok(())
}

/// A new volume file, made in a temporary file and renamed into place, so that a file
/// at `path` is always a whole volume.
async fn create_volume(path: &Path, size: u64, origin: &Origin) -> Result<(), DiskError> {
    if let Some(dir) = path.parent() {
        traversable(dir).await?;
    }
    let tmp = path.with_extension("qcow2.tmp");
    let _ = tokio::fs::remove_file(&tmp).await;
    match origin {
        Origin::Empty => {
            qemu_img(
                &["create", "-q", "-f", "qcow2", "-o", &format!("size={size}")],
                &tmp,
            )
            .await?
        }
        Origin::Copy { from, format } => {
            let from = from.to_string_lossy();
            // A full copy: the new volume depends on no other file.
            qemu_img(&["convert", "-q", "-f", format, "-O", "qcow2", &from], &tmp).await?;
            grow(&tmp, size).await?;
        }
    }
    private_file(&tmp).await?;
    tokio::fs::rename(&tmp, path).await?;
    Ok(())
}

/// A full qcow2 copy of `from` at `to` (replacing it whole: made aside, then renamed).
pub async fn copy(from: &Path, to: &Path) -> Result<(), DiskError> {
    let tmp = to.with_extension("qcow2.tmp");
    let _ = tokio::fs::remove_file(&tmp).await;
    let from = from.to_string_lossy();
    qemu_img(
        &["convert", "-q", "-f", "qcow2", "-O", "qcow2", &from],
        &tmp,
    )
    .await?;
    private_file(&tmp).await?;
    tokio::fs::rename(&tmp, to).await?;
    Ok(())
}

/// Grows a qcow2 file that no QEMU has open to `size` (never shrinks it).
pub async fn grow(path: &Path, size: u64) -> Result<(), DiskError> {
    if info(path).await?.virtual_size >= size {
        return Ok(());
    }
    run_qemu_img(&["resize", "-q", "-f", "qcow2"], path, &[&size.to_string()])
        .await
        .map(|_| ())
}

/// What `qemu-img info` says about an image file.
#[derive(Debug, serde::Deserialize)]
pub struct Info {
    #[serde(rename = "virtual-size")]
    pub virtual_size: u64,
}

pub async fn info(path: &Path) -> Result<Info, DiskError> {
    let out = run_qemu_img(&["info", "--output=json", "-U"], path, &[]).await?;
    serde_json::from_slice(&out.stdout).map_err(|e| DiskError::QemuImg {
        path: path.display().to_string(),
        reason: format!("unreadable qemu-img info: {e}"),
    })
}

/// Creates `dir` and its missing parents with mode 0711, and gives `dir` and its parent
/// (`vms/`, `image-cache/`) that mode: QEMU runs as its own user (Debian's libvirt-qemu)
/// and must reach the files libvirt hands it (libvirt's DAC driver chowns each to that
/// user while the domain runs); nobody may list them.
pub async fn traversable(dir: &Path) -> std::io::Result<()> {
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(&dir)?;
        // An existing directory keeps its mode: made by an older agent (0700), or by umask.
        for d in dir.parent().into_iter().chain([dir.as_path()]) {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o711))?;
        }
        Ok(())
    })
    .await
    .map_err(|e| std::io::Error::other(e.to_string()))?
}

/// Readable and writable by its owner only: root, or QEMU's user while libvirt lends it.
pub async fn private_file(path: &Path) -> std::io::Result<()> {
    tokio::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).await
}

/// Removes the VM's directory: overlays, blank disks, seed and console log.
pub async fn remove(vm_dir: &Path) -> Result<(), DiskError> {
    match tokio::fs::remove_dir_all(vm_dir).await {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
        _ => Ok(()),
    }
}
