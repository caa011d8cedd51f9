//! An in-memory [`Libvirt`]: domains are records that change state as libvirt's would,
//! and no guest code runs. It lets the agent's reconcile run (and be tested) without a
//! libvirtd, root or QEMU. Fakes opened with one URI share their domains, as clients of
//! one libvirtd do, so migrations between two fakes and `peek_guest` work.
//!
//! What it does not model: guest code (a shutdown request powers the guest off at
//! once), KVM, UEFI, addresses, device errors and migration failures.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::broadcast::{self, Sender};

use super::super::domain::owner_of;
use super::{
    Address, DomainInfo, DomainStats, Guest, Libvirt, LibvirtError, NodeInfo, Result, RunState,
};

#[derive(Debug, Clone)]
struct Record {
    name: String,
    xml: String,
    state: RunState,
    /// False for a transient domain, or a running one whose definition was removed:
    /// libvirt forgets it when it stops.
    persistent: bool,
    /// Whether its last completed job was a migration away.
    migrated: bool,
}

/// One simulated libvirtd: what every Fake opened with its URI sees.
struct Daemon {
    uri: String,
    domains: Mutex<BTreeMap<String, Record>>,
    events: Sender<String>,
    down: Mutex<Option<String>>,
    cpus: u32,
    memory_bytes: u64,
    /// What each running domain's interfaces are said to have (set_addresses).
    addresses: Mutex<HashMap<String, Vec<Address>>>,
    /// What a command run in each domain's guest exits with (set_guest_exec); no entry:
    /// the guest has no agent.
    exec: Mutex<HashMap<String, i64>>,
}

/// Every simulated libvirtd of this process, by URI.
fn daemons() -> &'static Mutex<HashMap<String, Weak<Daemon>>> {
    static DAEMONS: std::sync::OnceLock<Mutex<HashMap<String, Weak<Daemon>>>> =
        std::sync::OnceLock::new();
    DAEMONS.get_or_init(Default::default)
}

fn find(uri: &str) -> Option<Arc<Daemon>> {
    daemons().lock().expect("not poisoned").get(uri)?.upgrade()
}

fn refused(what: impl Into<String>) -> LibvirtError {
    LibvirtError::Refused(what.into())
}

#[derive(Clone)]
pub struct Fake {
    daemon: Arc<Daemon>,
}

impl Fake {
    /// The simulated libvirtd at `uri` (made on first use: 4 CPUs, 8 GiB).
    pub fn open(uri: &str) -> Self {
        let mut all = daemons().lock().expect("not poisoned");
        if let Some(daemon) = all.get(uri).and_then(Weak::upgrade) {
            return Fake { daemon };
        }
        let daemon = Arc::new(Daemon {
            uri: uri.to_string(),
            domains: Default::default(),
            events: broadcast::channel(1024).0,
            down: Default::default(),
            cpus: 4,
            memory_bytes: 8 << 30,
            addresses: Default::default(),
            exec: Default::default(),
        });
        all.insert(uri.to_string(), Arc::downgrade(&daemon));
        Fake { daemon }
    }

    fn change<T>(&self, uuid: &str, f: impl FnOnce(&mut BTreeMap<String, Record>) -> T) -> T {
        let out = f(&mut self.daemon.domains.lock().expect("not poisoned"));
        let _ = self.daemon.events.send(uuid.to_string());
        out
    }

    /// Sets a domain's state as something outside the agent would (a QEMU crash, a
    /// poweroff inside the guest, `virsh destroy`), and announces the change.
    pub fn set_state(&self, uuid: &str, state: RunState) {
        self.change(uuid, |d| {
            if let Some(r) = d.get_mut(uuid) {
                r.state = state;
            }
            forget_stopped_transients(d);
        })
    }

    /// The addresses the domain's interfaces report while it runs.
    pub fn set_addresses(&self, uuid: &str, addresses: Vec<Address>) {
        let mut all = self.daemon.addresses.lock().expect("not poisoned");
        all.insert(uuid.to_string(), addresses);
    }

    /// The exit code of every command the guest agent runs in the domain from now on.
    pub fn set_guest_exec(&self, uuid: &str, code: i64) {
        let mut all = self.daemon.exec.lock().expect("not poisoned");
        all.insert(uuid.to_string(), code);
    }

    /// Makes the connection fail (Some) or work again (None), as a libvirtd restart would.
    pub fn set_down(&self, why: Option<String>) {
        *self.daemon.down.lock().expect("not poisoned") = why;
    }

    fn check_up(&self) -> Result<()> {
        match self.daemon.down.lock().expect("not poisoned").clone() {
            Some(why) => Err(refused(why)),
            None => Ok(()),
        }
    }

    fn record(&self, uuid: &str) -> Option<Record> {
        self.daemon
            .domains
            .lock()
            .expect("not poisoned")
            .get(uuid)
            .cloned()
    }
}

fn forget_stopped_transients(domains: &mut BTreeMap<String, Record>) {
    domains.retain(|_, r| r.persistent || r.state.active());
}

fn info(uuid: &str, r: &Record) -> DomainInfo {
    DomainInfo {
        uuid: uuid.to_string(),
        name: r.name.clone(),
        state: r.state,
        owner: owner_of(&r.xml),
        xml: r.xml.clone(),
    }
}

fn guest_of(r: Option<&Record>) -> Guest {
    match r {
        None => Guest::Absent,
        Some(r) if r.state == RunState::MigratedAway => Guest::MigratedAway,
        Some(r) if r.state.active() => Guest::Active,
        Some(_) => Guest::Stopped,
    }
}

/// The name and UUID a domain definition declares.
fn identity(xml: &str) -> Result<(String, String)> {
    #[derive(serde::Deserialize)]
    struct Domain {
        name: String,
        uuid: String,
    }
    let d: Domain = quick_xml::de::from_str(xml)
        .map_err(|e| refused(format!("XML error: domain has no name or uuid: {e}")))?;
    Ok((d.name, d.uuid))
}

fn define_in(daemon: &Daemon, xml: String, state: Option<RunState>) -> Result<String> {
    let (name, uuid) = identity(&xml)?;
    let mut domains = daemon.domains.lock().expect("not poisoned");
    if let Some((other, _)) = domains.iter().find(|(u, r)| r.name == name && **u != uuid) {
        return Err(refused(format!(
            "operation failed: domain '{name}' already exists with uuid {other}"
        )));
    }
    let r = domains.entry(uuid.clone()).or_insert(Record {
        name,
        xml: String::new(),
        state: RunState::ShutOff,
        persistent: true,
        migrated: false,
    });
    r.xml = xml;
    r.persistent = true;
    if let Some(state) = state {
        r.state = state;
    }
    drop(domains);
    let _ = daemon.events.send(uuid.clone());
    Ok(uuid)
}

#[async_trait::async_trait]
impl Libvirt for Fake {
    fn uri(&self) -> &str {
        &self.daemon.uri
    }

    fn down(&self) -> Option<String> {
        self.daemon.down.lock().expect("not poisoned").clone()
    }

    async fn keep_connected(&self) {
        std::future::pending().await
    }

    fn lifecycle_events(&self) -> broadcast::Receiver<String> {
        self.daemon.events.subscribe()
    }

    async fn node_info(&self) -> Result<NodeInfo> {
        self.check_up()?;
        Ok(NodeInfo {
            cpus: self.daemon.cpus,
            memory_bytes: self.daemon.memory_bytes,
            libvirt_version: "0.0.0".into(),
            hypervisor_version: "fake 0.0.0".into(),
            driver: "fake".into(),
        })
    }

    async fn domain_types(&self) -> Result<Vec<String>> {
        self.check_up()?;
        Ok(vec!["qemu".into()])
    }

    async fn domain_capabilities(&self, virttype: &str) -> Result<String> {
        Err(refused(format!(
            "the fake libvirt runs no {virttype} guests"
        )))
    }

    async fn list(&self) -> Result<Vec<DomainInfo>> {
        self.check_up()?;
        let domains = self.daemon.domains.lock().expect("not poisoned");
        Ok(domains.iter().map(|(u, r)| info(u, r)).collect())
    }

    async fn lookup(&self, uuid: &str) -> Result<Option<DomainInfo>> {
        self.check_up()?;
        Ok(self.record(uuid).map(|r| info(uuid, &r)))
    }

    async fn define(&self, xml: String) -> Result<()> {
        self.check_up()?;
        define_in(&self.daemon, xml, None).map(|_| ())
    }

    async fn start(&self, uuid: &str) -> Result<()> {
        self.check_up()?;
        self.change(uuid, |d| match d.get_mut(uuid) {
            Some(r) if r.state.active() => Err(refused(
                "Requested operation is not valid: domain is already running",
            )),
            Some(r) => {
                r.state = RunState::Running;
                r.migrated = false;
                Ok(())
            }
            None => Ok(()),
        })
    }

    async fn shutdown(&self, uuid: &str) -> Result<()> {
        self.stop(uuid, RunState::ShutOff)
    }

    async fn destroy(&self, uuid: &str) -> Result<()> {
        self.stop(uuid, RunState::Destroyed)
    }

    async fn undefine(&self, uuid: &str) -> Result<()> {
        self.check_up()?;
        self.change(uuid, |d| {
            match d.get(uuid) {
                Some(r) if r.state.active() => d.get_mut(uuid).expect("present").persistent = false,
                Some(_) => {
                    d.remove(uuid);
                }
                None => {}
            }
            Ok(())
        })
    }

    async fn resume(&self, uuid: &str) -> Result<()> {
        self.check_up()?;
        self.change(uuid, |d| {
            if let Some(r) = d.get_mut(uuid).filter(|r| r.state == RunState::Paused) {
                r.state = RunState::Running;
            }
            Ok(())
        })
    }

    async fn create_transient(&self, _xml: String) -> Result<String> {
        Err(refused("the fake libvirt runs no guest code"))
    }

    async fn migratable_xml(&self, uuid: &str) -> Result<String> {
        self.check_up()?;
        match self.record(uuid) {
            Some(r) if r.state.active() => Ok(r.xml),
            Some(_) => Err(refused(
                "Requested operation is not valid: domain is not running",
            )),
            None => Err(refused(format!(
                "Domain not found: no domain with matching uuid '{uuid}'"
            ))),
        }
    }

    async fn migrate(
        &self,
        uuid: &str,
        dest_uri: &str,
        _data_uri: &str,
        dest_xml: String,
        _tls: bool,
        _copy_disks: Vec<String>,
        _shared: bool,
    ) -> Result<()> {
        self.check_up()?;
        let Some(dest) = find(dest_uri) else {
            return Err(refused(format!("unable to connect to {dest_uri}")));
        };
        if !self.record(uuid).is_some_and(|r| r.state.active()) {
            return Err(refused(
                "Requested operation is not valid: domain is not running",
            ));
        }
        define_in(&dest, dest_xml, Some(RunState::Running))?;
        self.change(uuid, |d| {
            if let Some(r) = d.get_mut(uuid) {
                r.state = RunState::MigratedAway;
                r.migrated = true;
            }
            forget_stopped_transients(d);
            Ok(())
        })
    }

    async fn block_resize(&self, uuid: &str, _disk: &str, _bytes: u64) -> Result<()> {
        match self.record(uuid) {
            Some(r) if r.state.active() => Ok(()),
            _ => Err(refused(
                "Requested operation is not valid: domain is not running",
            )),
        }
    }

    async fn open_console(&self, _uuid: &str) -> Result<super::GuestStream> {
        Err(refused("the fake libvirt has no consoles"))
    }

    async fn open_vnc(&self, _uuid: &str) -> Result<std::os::fd::OwnedFd> {
        Err(refused("the fake libvirt has no displays"))
    }

    async fn backup(&self, _uuid: &str, _xml: String, _quiesce: bool) -> Result<super::Quiesce> {
        Err(refused("the fake libvirt copies no disks"))
    }

    async fn completed_job(&self, uuid: &str) -> Result<(Option<u64>, Option<u64>)> {
        match self.record(uuid) {
            Some(r) if r.migrated => Ok((Some(0), Some(0))),
            _ => Err(refused("no completed job")),
        }
    }

    async fn abort_job(&self, _uuid: &str) -> Result<()> {
        Err(refused(
            "Requested operation is not valid: no job is active on the domain",
        ))
    }

    async fn guest(&self, uuid: &str) -> Result<Guest> {
        self.check_up()?;
        Ok(guest_of(self.record(uuid).as_ref()))
    }

    async fn peek_guest(&self, uri: &str, uuid: &str) -> Result<Guest> {
        let other = find(uri).ok_or_else(|| refused(format!("unable to connect to {uri}")))?;
        let domains = other.domains.lock().expect("not poisoned");
        Ok(guest_of(domains.get(uuid)))
    }

    async fn addresses(&self, uuid: &str, guest_agent: bool) -> Result<Vec<Address>> {
        self.check_up()?;
        if !self.record(uuid).is_some_and(|r| r.state.active()) {
            return Ok(Vec::new());
        }
        let all = self.daemon.addresses.lock().expect("not poisoned");
        Ok(all
            .get(uuid)
            .into_iter()
            .flatten()
            .filter(|a| guest_agent || a.source != crate::api::vm::AddressSource::GuestAgent)
            .cloned()
            .collect())
    }

    async fn guest_exec(
        &self,
        uuid: &str,
        _command: Vec<String>,
        _timeout: std::time::Duration,
    ) -> Result<i64> {
        self.check_up()?;
        if !self.record(uuid).is_some_and(|r| r.state.active()) {
            return Err(refused("the domain is not running"));
        }
        let all = self.daemon.exec.lock().expect("not poisoned");
        all.get(uuid)
            .copied()
            .ok_or_else(|| refused("QEMU guest agent is not connected"))
    }

    async fn stats(&self) -> Result<Vec<DomainStats>> {
        self.check_up()?;
        let domains = self.daemon.domains.lock().expect("not poisoned");
        Ok(domains
            .iter()
            .filter(|(_, r)| r.state.active())
            .map(|(uuid, _)| DomainStats {
                uuid: uuid.clone(),
                ..Default::default()
            })
            .collect())
    }
}

impl Fake {
    fn stop(&self, uuid: &str, to: RunState) -> Result<()> {
        self.check_up()?;
        self.change(uuid, |d| {
            if let Some(r) = d.get_mut(uuid).filter(|r| r.state.active()) {
                r.state = to;
            }
            forget_stopped_transients(d);
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn xml(name: &str, uuid: &str) -> String {
        format!("<domain type='qemu'><name>{name}</name><uuid>{uuid}</uuid></domain>")
    }

    const A: &str = "00000000-0000-0000-0000-00000000000a";
    const B: &str = "00000000-0000-0000-0000-00000000000b";

    fn state(lv: &Fake, uuid: &str) -> Option<RunState> {
        lv.record(uuid).map(|r| r.state)
    }

    #[tokio::test]
    async fn domains_change_state_as_libvirts_do() {
        let lv = Fake::open("fake:///lifecycle");
        let mut events = lv.lifecycle_events();
        lv.define(xml("a", A)).await.unwrap();
        assert_eq!(state(&lv, A), Some(RunState::ShutOff));
        assert_eq!(events.recv().await.unwrap(), A);
        // Another uuid cannot take a defined name; the same uuid redefines.
        assert!(lv.define(xml("a", B)).await.is_err());
        lv.define(xml("a", A)).await.unwrap();
        lv.start(A).await.unwrap();
        assert!(
            lv.start(A).await.is_err(),
            "starting a running domain fails"
        );
        assert_eq!(state(&lv, A), Some(RunState::Running));
        lv.shutdown(A).await.unwrap();
        assert_eq!(state(&lv, A), Some(RunState::ShutOff));
        lv.start(A).await.unwrap();
        lv.destroy(A).await.unwrap();
        assert_eq!(state(&lv, A), Some(RunState::Destroyed));
        // A running domain that is undefined lives on, transient, until it stops.
        lv.start(A).await.unwrap();
        lv.undefine(A).await.unwrap();
        assert_eq!(state(&lv, A), Some(RunState::Running));
        lv.destroy(A).await.unwrap();
        assert_eq!(lv.lookup(A).await.unwrap().map(|d| d.state), None);
        // Operations on a missing domain do nothing.
        lv.start(B).await.unwrap();
        lv.destroy(B).await.unwrap();
        lv.undefine(B).await.unwrap();
        assert!(lv.list().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn fakes_of_one_uri_share_domains_and_migrate_between_uris() {
        let (src, dst) = (Fake::open("fake:///src"), Fake::open("fake:///dst"));
        src.define(xml("m", A)).await.unwrap();
        assert_eq!(Fake::open("fake:///src").list().await.unwrap().len(), 1);
        assert!(
            src.migrate(A, "fake:///dst", "", xml("m", A), false, vec![], false)
                .await
                .is_err(),
            "a stopped domain does not migrate"
        );
        src.start(A).await.unwrap();
        assert!(
            src.migrate(A, "fake:///nowhere", "", xml("m", A), false, vec![], false)
                .await
                .is_err()
        );
        src.migrate(A, "fake:///dst", "", xml("m", A), false, vec![], false)
            .await
            .unwrap();
        assert_eq!(state(&src, A), Some(RunState::MigratedAway));
        assert_eq!(state(&dst, A), Some(RunState::Running));
        assert_eq!(src.guest(A).await.unwrap(), Guest::MigratedAway);
        assert_eq!(
            src.peek_guest("fake:///dst", A).await.unwrap(),
            Guest::Active
        );
        assert!(src.completed_job(A).await.is_ok());
        assert_eq!(
            dst.peek_guest("fake:///src", B).await.unwrap(),
            Guest::Absent
        );
    }

    #[tokio::test]
    async fn a_down_connection_fails_every_call_until_it_is_up() {
        let lv = Fake::open("fake:///down");
        lv.set_down(Some("the connection to libvirtd was lost".into()));
        assert!(lv.list().await.is_err());
        assert!(lv.define(xml("d", A)).await.is_err());
        assert!(lv.down().is_some());
        lv.set_down(None);
        lv.define(xml("d", A)).await.unwrap();
        lv.set_state(A, RunState::Crashed);
        assert_eq!(state(&lv, A), Some(RunState::Crashed));
    }
}
