//! The agent's seam to libvirt: the [`Libvirt`] trait and the types it speaks. The
//! real implementation ([`conn::Connection`]) is the one place that calls libvirt; the
//! in-memory [`fake::Fake`] lets the agent's reconcile run and be tested without a
//! libvirtd, root or QEMU.

pub mod conn;
pub mod fake;

use std::sync::Arc;
use std::time::Duration;

use super::domain::VmMetadata;

pub use conn::Connection;
pub use fake::Fake;

#[derive(Debug, thiserror::Error)]
pub enum LibvirtError {
    #[error("libvirt: {0}")]
    Virt(#[from] virt::error::Error),
    #[error("libvirt call panicked or was cancelled")]
    Join,
    /// Refused by an implementation that is not libvirt (the fake).
    #[error("{0}")]
    Refused(String),
}

pub type Result<T> = std::result::Result<T, LibvirtError>;

/// A domain's run state, simplified from virDomainState and its reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    Running,
    Paused,
    ShuttingDown,
    /// Stopped by the guest (poweroff) or by us.
    ShutOff,
    /// Stopped because QEMU crashed or failed.
    Crashed,
    /// Stopped by `virsh destroy` (from us or from outside) or because QEMU was killed.
    Destroyed,
    /// Shut off because a live migration moved the guest to another host: it runs there,
    /// and this definition must never be started again.
    MigratedAway,
    Other,
}

impl RunState {
    /// Whether a QEMU process runs the domain (running, paused or shutting down).
    pub fn active(self) -> bool {
        matches!(
            self,
            RunState::Running | RunState::Paused | RunState::ShuttingDown
        )
    }
}

/// Where one libvirt holds a guest, as much as settling an interrupted migration needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guest {
    /// No domain with this uuid.
    Absent,
    /// A migration job runs on it (libvirt's source side).
    Migrating,
    /// Paused for a migration's switch-over, or arriving (libvirt's destination side
    /// keeps an incoming guest paused until the copy is done).
    PausedForMigration,
    /// Running, or paused for another reason: a live copy of the guest.
    Active,
    /// Shut off because it migrated to another host.
    MigratedAway,
    /// Defined and shut off for any other reason.
    Stopped,
}

#[derive(Debug, Clone)]
pub struct DomainInfo {
    pub uuid: String,
    pub name: String,
    pub state: RunState,
    pub owner: Option<VmMetadata>,
    /// The defined (inactive) XML: what the next start would run.
    pub xml: String,
}

#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub cpus: u32,
    pub memory_bytes: u64,
    pub libvirt_version: String,
    pub hypervisor_version: String,
    pub driver: String,
}

/// Per-domain counters from libvirt's bulk stats.
#[derive(Debug, Clone, Default)]
pub struct DomainStats {
    pub uuid: String,
    pub cpu_time_ns: u64,
    pub memory_bytes: u64,
    pub disk_read_bytes: u64,
    pub disk_write_bytes: u64,
    pub net_rx_bytes: u64,
    pub net_tx_bytes: u64,
}

/// Every libvirt operation the agent performs, on one node's libvirt. Domains are named
/// by UUID (the VM's uid). Operations on a domain that does not exist succeed doing
/// nothing, except where they return what they found.
/// A byte stream to a guest's device: what the guest writes arrives on `output`, what is
/// sent on `input` reaches the guest. It ends when the domain goes, or when both ends
/// here are dropped.
pub struct GuestStream {
    pub output: tokio::sync::mpsc::Receiver<Vec<u8>>,
    pub input: tokio::sync::mpsc::Sender<Vec<u8>>,
}

/// What freezing the guest's filesystems around a backup came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Quiesce {
    /// Not asked: the VM has no guest agent channel.
    NotAsked,
    /// The guest agent froze this many filesystems for the instant of the copy.
    Frozen(u32),
    /// Asked, but the agent did not freeze (not running, not answering): the copy is
    /// crash-consistent only.
    Failed(String),
}

#[async_trait::async_trait]
pub trait Libvirt: Send + Sync {
    /// The connection URI, as other nodes' agents reach this libvirt for migrations.
    fn uri(&self) -> &str;
    /// None while the connection works; why not, while it does not.
    fn down(&self) -> Option<String>;
    /// Keeps the connection up (reconnecting after a libvirtd restart); never returns.
    async fn keep_connected(&self);
    /// The UUID of every domain whose lifecycle changes, from now on. A subscriber that
    /// falls behind skips old events.
    fn lifecycle_events(&self) -> tokio::sync::broadcast::Receiver<String>;

    async fn node_info(&self) -> Result<NodeInfo>;
    /// The guest domain types (`kvm`, `qemu`, ...) this libvirt's driver can run.
    async fn domain_types(&self) -> Result<Vec<String>>;
    /// libvirt's domain capabilities for x86_64 guests of `virttype` (kvm, qemu); an
    /// error when libvirt cannot run such guests at all (e.g. no usable /dev/kvm).
    async fn domain_capabilities(&self, virttype: &str) -> Result<String>;
    /// Whether this libvirt can boot `virttype` guests with UEFI firmware: its domain
    /// capabilities list `efi` among the firmware it auto-selects. Read from libvirt,
    /// not from the agent's container.
    async fn uefi(&self, virttype: &str) -> Result<bool> {
        Ok(uefi_in_domcaps(&self.domain_capabilities(virttype).await?))
    }

    /// Every domain on the node, active or not.
    async fn list(&self) -> Result<Vec<DomainInfo>>;
    async fn lookup(&self, uuid: &str) -> Result<Option<DomainInfo>>;
    /// Defines (or redefines) a domain from XML.
    async fn define(&self, xml: String) -> Result<()>;
    async fn start(&self, uuid: &str) -> Result<()>;
    /// Asks the guest to power off through ACPI.
    async fn shutdown(&self, uuid: &str) -> Result<()>;
    async fn destroy(&self, uuid: &str) -> Result<()>;
    /// Removes the definition; also NVRAM, which UEFI domains carry.
    async fn undefine(&self, uuid: &str) -> Result<()>;
    /// Resumes a paused domain.
    async fn resume(&self, uuid: &str) -> Result<()>;
    /// Starts a domain that libvirt forgets once it stops (the KVM probe); its UUID.
    async fn create_transient(&self, xml: String) -> Result<String>;

    /// The running domain's XML in the form a migration destination takes.
    async fn migratable_xml(&self, uuid: &str) -> Result<String>;
    /// Live-migrates a running domain, peer to peer, to the libvirt at `dest_uri`
    /// (memory, and incrementally the disks named in `copy_disks` by target device, over
    /// `data_uri`; disks not named are on storage both nodes share); the destination
    /// defines it from `dest_xml`. The source's definition stays, shut off
    /// ([`RunState::MigratedAway`]), until undefined. Returns when the migration ends.
    /// With `shared`, the disks not copied are on a storage pool the admin declared
    /// shared: libvirt's own guess (it recognises NFS, CephFS, GFS2 and a few more) is
    /// overridden.
    #[allow(clippy::too_many_arguments)]
    async fn migrate(
        &self,
        uuid: &str,
        dest_uri: &str,
        data_uri: &str,
        dest_xml: String,
        tls: bool,
        copy_disks: Vec<String>,
        shared: bool,
    ) -> Result<()>;
    /// Grows a disk of a running domain (named by its source file) to `bytes`; the guest
    /// sees the new size at once.
    async fn block_resize(&self, uuid: &str, disk: &str, bytes: u64) -> Result<()>;
    /// Copies disks of a running domain as they are at this instant (libvirt's push-mode
    /// backup job, described by `backup_xml`), and returns when the copies are complete.
    /// With `quiesce`, the guest agent freezes the guest's filesystems for the instant
    /// the job starts and thaws them right after (the job copies that instant).
    async fn backup(&self, uuid: &str, backup_xml: String, quiesce: bool) -> Result<Quiesce>;
    /// Statistics of the domain's last completed job: (downtime in ms, bytes sent).
    async fn completed_job(&self, uuid: &str) -> Result<(Option<u64>, Option<u64>)>;
    /// Aborts the domain's running job (a migration): the domain keeps running here.
    async fn abort_job(&self, uuid: &str) -> Result<()>;
    /// Where this libvirt holds the guest, for settling a migration.
    async fn guest(&self, uuid: &str) -> Result<Guest>;
    /// Where the libvirt at `uri` (another node's) holds the guest, asked read-only.
    async fn peek_guest(&self, uri: &str, uuid: &str) -> Result<Guest>;

    /// The domain's serial console as a stream, taken over from any other session.
    async fn open_console(&self, uuid: &str) -> Result<GuestStream>;
    /// A connection to the domain's VNC server, which listens nowhere else. Only over a
    /// local (unix socket) connection to libvirtd: the descriptor is passed over it.
    async fn open_vnc(&self, uuid: &str) -> Result<std::os::fd::OwnedFd>;

    /// Every address of a running domain's interfaces that libvirt can learn: from the
    /// guest agent (only when `guest_agent`: the domain has its channel), the node's
    /// neighbour table and its DHCP leases, each tagged with where it came from. A
    /// source that knows nothing (no agent running, no lease) adds nothing.
    async fn addresses(&self, uuid: &str, guest_agent: bool) -> Result<Vec<Address>>;
    /// Runs `command` (a path and its arguments, no shell) in the guest through its
    /// agent and returns its exit code once it ends; an error when the agent does not
    /// answer or the command does not end within `timeout`.
    async fn guest_exec(&self, uuid: &str, command: Vec<String>, timeout: Duration) -> Result<i64>;
    /// CPU, memory, disk and network counters of every running domain.
    async fn stats(&self) -> Result<Vec<DomainStats>>;
}

/// One address of a domain's interface, as one source tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    pub mac: String,
    pub ip: String,
    pub source: crate::api::vm::AddressSource,
}

/// The guest agent's `guest-exec` of `command` (no shell, no output kept), as JSON.
pub fn guest_exec_request(command: &[String]) -> String {
    serde_json::json!({"execute": "guest-exec", "arguments": {
        "path": command.first().cloned().unwrap_or_default(),
        "arg": command.get(1..).unwrap_or_default(),
        "capture-output": false,
    }})
    .to_string()
}

pub fn guest_exec_status_request(pid: i64) -> String {
    serde_json::json!({"execute": "guest-exec-status", "arguments": {"pid": pid}}).to_string()
}

/// The pid in a `guest-exec` reply.
pub fn guest_exec_pid(reply: &str) -> Option<i64> {
    serde_json::from_str::<serde_json::Value>(reply).ok()?["return"]["pid"].as_i64()
}

/// The exit code in a `guest-exec-status` reply, once the command has ended (a command
/// killed by a signal counts as exit code 128 + the signal, as a shell says).
pub fn guest_exec_exited(reply: &str) -> Option<i64> {
    let v: serde_json::Value = serde_json::from_str(reply).ok()?;
    let r = &v["return"];
    if r["exited"].as_bool() != Some(true) {
        return None;
    }
    r["exitcode"]
        .as_i64()
        .or_else(|| r["signal"].as_i64().map(|s| 128 + s))
        .or(Some(-1))
}

/// The libvirt an agent works with.
pub type Shared = Arc<dyn Libvirt>;

/// The guest domain types in capabilities XML: `<guest><arch><domain type='kvm'/>`.
pub fn domain_types_in_caps(xml: &str) -> Vec<String> {
    #[derive(serde::Deserialize)]
    struct Capabilities {
        #[serde(default)]
        guest: Vec<GuestCaps>,
    }
    #[derive(serde::Deserialize)]
    struct GuestCaps {
        arch: Option<Arch>,
    }
    #[derive(serde::Deserialize)]
    struct Arch {
        #[serde(default)]
        domain: Vec<DomainType>,
    }
    #[derive(serde::Deserialize)]
    struct DomainType {
        #[serde(rename = "@type")]
        kind: String,
    }
    let mut types: Vec<String> = quick_xml::de::from_str::<Capabilities>(xml)
        .map(|c| c.guest)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|g| g.arch)
        .flat_map(|a| a.domain)
        .map(|d| d.kind)
        .collect();
    let mut seen = std::collections::HashSet::new();
    types.retain(|t| seen.insert(t.clone()));
    types
}

/// Whether domain capabilities XML offers firmware `efi`:
/// `<os supported='yes'><enum name='firmware'><value>efi</value>…`.
pub fn uefi_in_domcaps(xml: &str) -> bool {
    #[derive(serde::Deserialize)]
    struct DomainCapabilities {
        os: Option<Os>,
    }
    #[derive(serde::Deserialize)]
    struct Os {
        #[serde(rename = "enum", default)]
        enums: Vec<Enum>,
    }
    #[derive(serde::Deserialize)]
    struct Enum {
        #[serde(rename = "@name")]
        name: String,
        #[serde(rename = "value", default)]
        values: Vec<String>,
    }
    quick_xml::de::from_str::<DomainCapabilities>(xml)
        .ok()
        .and_then(|c| c.os)
        .is_some_and(|os| {
            os.enums
                .iter()
                .any(|e| e.name == "firmware" && e.values.iter().any(|v| v.trim() == "efi"))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uefi_is_read_from_the_firmware_libvirt_offers() {
        // What this machine's libvirt 9.0 answered without and with Debian's ovmf.
        let without = "<domainCapabilities><os supported='yes'><enum name='firmware'/><loader supported='yes'><enum name='type'><value>rom</value><value>pflash</value></enum></loader></os></domainCapabilities>";
        let with = "<domainCapabilities><os supported='yes'><enum name='firmware'>\n      <value>efi</value>\n    </enum><loader supported='yes'><value>/usr/share/OVMF/OVMF_CODE_4M.fd</value></loader></os></domainCapabilities>";
        // An `efi` elsewhere (another enum, another element) is not the firmware list.
        let elsewhere = "<domainCapabilities><os supported='yes'><enum name='firmware'/><enum name='other'><value>efi</value></enum></os><features><enum name='firmware'><value>efi</value></enum></features></domainCapabilities>";
        for (xml, uefi) in [
            (without, false),
            (with, true),
            (elsewhere, false),
            ("<broken", false),
            ("", false),
        ] {
            assert_eq!(uefi_in_domcaps(xml), uefi, "{xml}");
        }
    }

    #[test]
    fn guest_exec_speaks_the_agents_protocol() {
        let cmd = vec!["/bin/sh".to_string(), "-c".into(), "test -f \"/x\"".into()];
        let req: serde_json::Value = serde_json::from_str(&guest_exec_request(&cmd)).unwrap();
        assert_eq!(req["execute"], "guest-exec");
        assert_eq!(req["arguments"]["path"], "/bin/sh");
        assert_eq!(req["arguments"]["arg"][1], "test -f \"/x\"");
        assert_eq!(guest_exec_pid(r#"{"return":{"pid":42}}"#), Some(42));
        assert_eq!(
            guest_exec_pid(r#"{"error":{"class":"GenericError"}}"#),
            None
        );
        for (reply, want) in [
            (r#"{"return":{"exited":false}}"#, None),
            (r#"{"return":{"exited":true,"exitcode":0}}"#, Some(0)),
            (r#"{"return":{"exited":true,"exitcode":3}}"#, Some(3)),
            (r#"{"return":{"exited":true,"signal":9}}"#, Some(137)),
            (r#"{"return":{"exited":true}}"#, Some(-1)),
            ("not json", None),
        ] {
            assert_eq!(guest_exec_exited(reply), want, "{reply}");
        }
    }

    #[test]
    fn domain_types_come_from_every_guest_in_the_capabilities() {
        // Shaped as qemu:///system (x86_64 and i686 guests) and test:///default answer.
        let qemu = "<capabilities><host/><guest><os_type>hvm</os_type><arch name='x86_64'><domain type='qemu'/><domain type='kvm'/></arch></guest><guest><os_type>hvm</os_type><arch name='i686'><domain type='qemu'/><domain type='kvm'/></arch></guest></capabilities>";
        let test = "<capabilities><host/><guest><os_type>hvm</os_type><arch name='i686'><domain type='test'/></arch></guest><guest><os_type>xen</os_type><arch name='i686'><domain type='test'/></arch></guest></capabilities>";
        let tcg_only = "<capabilities><guest><arch name='x86_64'><domain type='qemu'/></arch></guest></capabilities>";
        for (xml, want) in [
            (qemu, vec!["qemu", "kvm"]),
            (test, vec!["test"]),
            (tcg_only, vec!["qemu"]),
            ("<capabilities><host/></capabilities>", vec![]),
            ("<broken", vec![]),
        ] {
            assert_eq!(domain_types_in_caps(xml), want, "{xml}");
        }
    }
}
