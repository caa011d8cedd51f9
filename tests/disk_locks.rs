//! One writer per disk, whatever agents and the controller believe: the two libvirt hosts
//! of hack/hosts.sh run virtlockd (`lock_manager = "lockd"`), and a domain on one host
//! holds a lease on its writable disk: an fcntl lock on the file itself, held by that
//! host's virtlockd, which another node's virtlockd sees through a shared file system
//! (NFS locking) where QEMU's own image locks may not reach. Checked: while the first
//! host's domain runs, its virtlockd holds the lease and a second domain over the same
//! file on the other host does not start; once the first is destroyed, the second starts
//! and the other host's virtlockd holds the lease.
//!
//! On one machine QEMU's own image lock answers first: libvirt starts QEMU paused (it
//! opens the image, taking its lock) and takes the leases when the CPUs start. So the
//! test checks the lease itself in /proc/locks rather than the words of the refusal.
//!
//! Needs `hack/hosts.sh up` (make test runs it).

mod common;

use std::process::Command;

const H1: &str = "qemu+tcp://10.77.0.1/system";
const H2: &str = "qemu+tcp://10.77.0.2/system";

fn virsh(uri: &str, args: &[&str]) -> std::process::Output {
    Command::new("virsh")
        .arg("-c")
        .arg(uri)
        .args(args)
        .output()
        .expect("virsh")
}

/// Destroys and undefines the domain on its host when the test ends, however it ends.
struct Domain(&'static str, String);

impl Drop for Domain {
    fn drop(&mut self) {
        let _ = virsh(self.0, &["destroy", &self.1]);
        let _ = virsh(self.0, &["undefine", &self.1]);
    }
}

fn define(uri: &'static str, name: &str, disk: &std::path::Path) -> Domain {
    // SeaBIOS finds nothing to boot and keeps trying: the domain runs, holding its disk.
    let xml = format!(
        "<domain type='qemu'><name>{name}</name><memory unit='MiB'>32</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64'>hvm</type></os><devices>\
         <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
         <source file='{}'/><target dev='vda' bus='virtio'/></disk>\
         </devices></domain>",
        disk.display()
    );
    let file = std::env::temp_dir().join(format!("{name}.xml"));
    std::fs::write(&file, xml).unwrap();
    let out = virsh(uri, &["define", file.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "define on {uri}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Domain(uri, name.to_string())
}

#[test]
fn a_disk_one_host_writes_is_refused_to_the_other() {
    let out = virsh(H1, &["version"]);
    assert!(out.status.success(), "hack/hosts.sh up first");
    // A directory both hosts see (they share this machine's filesystem, as nodes share
    // a pool), traversable by QEMU's user.
    let dir = common::qemu_tempdir();
    let disk = dir.path().join("shared.qcow2");
    common::qemu_img(["create", "-q", "-f", "qcow2", disk.to_str().unwrap(), "16M"]);
    let pid = std::process::id();
    let first = define(H1, &format!("lock-a-{pid}"), &disk);
    let second = define(H2, &format!("lock-b-{pid}"), &disk);

    let out = virsh(H1, &["start", &first.1]);
    assert!(
        out.status.success(),
        "the first start: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        lease_holder(&disk),
        Some(virtlockd(1)),
        "host 1's virtlockd holds no lease on the running domain's disk"
    );
    let out = virsh(H2, &["start", &second.1]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "two hosts' QEMUs write one disk");
    assert!(err.contains("lock"), "refused, but not for a lock: {err}");
    eprintln!("refused: {}", err.trim().replace('\n', " "));

    let out = virsh(H1, &["destroy", &first.1]);
    assert!(out.status.success());
    assert_eq!(lease_holder(&disk), None, "the lease outlived its domain");
    let out = virsh(H2, &["start", &second.1]);
    assert!(
        out.status.success(),
        "the disk is free, yet the second host could not start: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(lease_holder(&disk), Some(virtlockd(2)));
}

/// The pid of hack/hosts.sh's host `n`'s virtlockd.
fn virtlockd(n: u32) -> u32 {
    let pid = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(format!(".cache/hosts/h{n}/virtlockd.pid"));
    std::fs::read_to_string(&pid)
        .unwrap_or_else(|e| panic!("{}: {e} (hack/hosts.sh up)", pid.display()))
        .trim()
        .parse()
        .unwrap()
}

/// The pid holding a POSIX (fcntl) write lock on the file: virtlockd's lease. QEMU's own
/// locks are OFD locks, which /proc/locks lists without a pid.
fn lease_holder(file: &std::path::Path) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    let ino = std::fs::metadata(file).unwrap().ino();
    std::fs::read_to_string("/proc/locks")
        .unwrap()
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| {
            f.get(1) == Some(&"POSIX")
                && f.get(3) == Some(&"WRITE")
                && f.get(5)
                    .is_some_and(|dev_ino| dev_ino.ends_with(&format!(":{ino}")))
        })
        .and_then(|f| f.get(4)?.parse().ok())
}
