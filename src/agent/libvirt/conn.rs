//! The real [`Libvirt`]: every libvirt call the agent makes. libvirt blocks, so each
//! call runs on tokio's blocking pool; one connection is shared (the test driver keeps
//! its state per connection, and libvirt connections are thread-safe).

use std::ffi::{CStr, c_void};
use std::sync::{Arc, Mutex, Once, RwLock};
use std::time::Duration;

use tokio::sync::broadcast::Sender;
use virt::connect::Connect;
use virt::domain::Domain;
use virt::sys;

use super::super::domain::owner_of;
use super::{
    Address, DomainInfo, DomainStats, Guest, GuestStream, Libvirt, LibvirtError, NodeInfo, Quiesce,
    Result, RunState,
};

/// Seconds a guest agent command may take before libvirt gives up on it.
const AGENT_TIMEOUT_S: i32 = 5;

fn guest_of(dom: &Domain) -> Result<Guest> {
    let (state, reason) = state_and_reason(dom)?;
    if state == sys::VIR_DOMAIN_SHUTOFF || state == sys::VIR_DOMAIN_CRASHED {
        return Ok(if reason == sys::VIR_DOMAIN_SHUTOFF_MIGRATED {
            Guest::MigratedAway
        } else {
            Guest::Stopped
        });
    }
    let job = match dom.job_info() {
        Ok(j) => j.r#type,
        // Drivers without jobs (the test driver) run no migrations either.
        Err(e) if e.code() == virt::enumutil::Enum::Known(virt::error::ErrorNumber::NoSupport) => {
            sys::VIR_DOMAIN_JOB_NONE as i32
        }
        Err(e) => return Err(e.into()),
    };
    if job != sys::VIR_DOMAIN_JOB_NONE as i32 {
        return Ok(Guest::Migrating);
    }
    Ok(
        if state == sys::VIR_DOMAIN_PAUSED && reason == sys::VIR_DOMAIN_PAUSED_MIGRATION {
            Guest::PausedForMigration
        } else {
            Guest::Active
        },
    )
}

fn guest_in(c: &Connect, uuid: &str) -> Result<Guest> {
    match c.lookup_domain_by_uuid_string(uuid) {
        Ok(d) => match guest_of(&d) {
            Err(LibvirtError::Virt(e)) if is_no_domain(&e) => Ok(Guest::Absent),
            other => other,
        },
        Err(e) if is_no_domain(&e) => Ok(Guest::Absent),
        Err(e) => Err(e.into()),
    }
}

/// What the libvirt at `uri` (another node's) holds of a guest, through a read-only
/// connection of its own, opened for this one question.
async fn peek_guest(uri: &str, uuid: &str) -> Result<Guest> {
    let (uri, uuid) = (uri.to_string(), uuid.to_string());
    tokio::task::spawn_blocking(move || {
        let c = Connect::open_read_only(Some(&uri))?;
        guest_in(&c, &uuid)
    })
    .await
    .map_err(|_| LibvirtError::Join)?
}

#[derive(Clone)]
pub struct Connection {
    /// Replaced by [`Libvirt::keep_connected`] when libvirtd restarts.
    conn: Arc<RwLock<Arc<Connect>>>,
    uri: String,
    /// Lifecycle events, registered once per connection (registering again on a live
    /// connection deadlocked against the event loop here) and fanned out to subscribers.
    events: Sender<String>,
    /// Why the connection is down, while it is (None: it works).
    down: Arc<Mutex<Option<String>>>,
}

static EVENT_LOOP: Once = Once::new();

/// libvirt delivers events only when an event loop is registered before the connection
/// opens and something runs it; a dedicated thread does.
fn start_event_loop() {
    EVENT_LOOP.call_once(|| {
        virt::error::clear_error_callback();
        if unsafe { sys::virEventRegisterDefaultImpl() } < 0 {
            tracing::warn!("libvirt event loop registration failed: lifecycle events unavailable");
            return;
        }
        std::thread::Builder::new()
            .name("libvirt-events".into())
            .spawn(|| {
                loop {
                    if unsafe { sys::virEventRunDefaultImpl() } < 0 {
                        std::thread::sleep(std::time::Duration::from_millis(100));
                    }
                }
            })
            .expect("spawn libvirt event thread");
    });
}

fn uuid_of(dom: &Domain) -> Result<String> {
    Ok(dom.uuid_string()?)
}

/// virDomainGetState: the state and its reason (the virt crate's `state()` drops the
/// reason, and can say Unknown for an undefined handle instead of failing).
fn state_and_reason(dom: &Domain) -> Result<(sys::virDomainState, u32)> {
    let (mut state, mut reason) = (-1i32, -1i32);
    // SAFETY: a live domain handle and two out-parameters.
    if unsafe { sys::virDomainGetState(dom.as_ptr(), &mut state, &mut reason, 0) } < 0 {
        return Err(virt::error::Error::last_error().into());
    }
    Ok((state as sys::virDomainState, reason as u32))
}

fn run_state(dom: &Domain) -> Result<RunState> {
    let (state, reason) = state_and_reason(dom)?;
    Ok(match state {
        sys::VIR_DOMAIN_RUNNING | sys::VIR_DOMAIN_BLOCKED => RunState::Running,
        sys::VIR_DOMAIN_PAUSED | sys::VIR_DOMAIN_PMSUSPENDED => RunState::Paused,
        sys::VIR_DOMAIN_SHUTDOWN => RunState::ShuttingDown,
        sys::VIR_DOMAIN_CRASHED => RunState::Crashed,
        sys::VIR_DOMAIN_SHUTOFF => match reason {
            sys::VIR_DOMAIN_SHUTOFF_CRASHED | sys::VIR_DOMAIN_SHUTOFF_FAILED => RunState::Crashed,
            sys::VIR_DOMAIN_SHUTOFF_DESTROYED => RunState::Destroyed,
            sys::VIR_DOMAIN_SHUTOFF_MIGRATED => RunState::MigratedAway,
            _ => RunState::ShutOff,
        },
        _ => RunState::Other,
    })
}

fn info_of(dom: &Domain) -> Result<DomainInfo> {
    let xml = dom.xml_desc(sys::VIR_DOMAIN_XML_INACTIVE)?;
    Ok(DomainInfo {
        uuid: uuid_of(dom)?,
        name: dom.name()?,
        state: run_state(dom)?,
        owner: owner_of(&xml),
        xml,
    })
}

fn version_string(v: u32) -> String {
    format!("{}.{}.{}", v / 1_000_000, (v / 1000) % 1000, v % 1000)
}

fn is_no_domain(e: &virt::error::Error) -> bool {
    e.code() == virt::enumutil::Enum::Known(virt::error::ErrorNumber::NoDomain)
}

impl Connection {
    pub async fn open(uri: &str) -> Result<Self> {
        let uri = uri.to_string();
        let conn = tokio::task::spawn_blocking({
            let uri = uri.clone();
            move || {
                start_event_loop();
                Connect::open(Some(&uri))
            }
        })
        .await
        .map_err(|_| LibvirtError::Join)??;
        let (events, _) = tokio::sync::broadcast::channel(1024);
        let lv = Connection {
            conn: Arc::new(RwLock::new(Arc::new(conn))),
            uri,
            events,
            down: Default::default(),
        };
        lv.register_lifecycle_events().await?;
        Ok(lv)
    }

    fn mark_down(&self, why: String) {
        let mut down = self.down.lock().expect("not poisoned");
        if down.is_none() {
            tracing::error!(uri = %self.uri, reason = %why, "libvirt unreachable");
        }
        *down = Some(why);
    }

    fn current(&self) -> Arc<Connect> {
        self.conn.read().expect("not poisoned").clone()
    }

    async fn call<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connect) -> Result<T> + Send + 'static,
    {
        let conn = self.current();
        let (res, alive) = tokio::task::spawn_blocking(move || {
            let res = f(&conn);
            // A failed call on a dead connection: libvirtd went away.
            let alive = res.is_ok() || conn.is_alive().unwrap_or(false);
            (res, alive)
        })
        .await
        .map_err(|_| LibvirtError::Join)?;
        if !alive {
            self.mark_down("the connection to libvirtd was lost".into());
        }
        res
    }

    async fn with_domain<F>(&self, uuid: &str, f: F) -> Result<()>
    where
        F: FnOnce(&Domain) -> std::result::Result<(), virt::error::Error> + Send + 'static,
    {
        let uuid = uuid.to_string();
        self.call(move |c| match c.lookup_domain_by_uuid_string(&uuid) {
            Ok(d) => Ok(f(&d)?),
            Err(e) if is_no_domain(&e) => Ok(()),
            Err(e) => Err(e.into()),
        })
        .await
    }

    async fn register_lifecycle_events(&self) -> Result<()> {
        let tx = self.events.clone();
        self.call(move |c| {
            let opaque = Box::into_raw(Box::new(tx)) as *mut c_void;
            // SAFETY: the callback has the generic signature libvirt expects for
            // VIR_DOMAIN_EVENT_ID_LIFECYCLE once cast; `free_sender` frees opaque exactly once.
            let cb: sys::virConnectDomainEventGenericCallback = Some(unsafe {
                std::mem::transmute::<
                    unsafe extern "C" fn(
                        sys::virConnectPtr,
                        sys::virDomainPtr,
                        i32,
                        i32,
                        *mut c_void,
                    ) -> i32,
                    unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *mut c_void),
                >(on_lifecycle)
            });
            let id = unsafe {
                sys::virConnectDomainEventRegisterAny(
                    c.as_ptr(),
                    std::ptr::null_mut(),
                    sys::VIR_DOMAIN_EVENT_ID_LIFECYCLE as i32,
                    cb,
                    opaque,
                    Some(free_sender),
                )
            };
            if id < 0 {
                unsafe { free_sender(opaque) };
                return Err(virt::error::Error::last_error().into());
            }
            Ok(())
        })
        .await
    }
}

#[async_trait::async_trait]
impl Libvirt for Connection {
    fn down(&self) -> Option<String> {
        self.down.lock().expect("not poisoned").clone()
    }

    async fn keep_connected(&self) {
        // When libvirtd has gone away (restart, crash): a new connection with backoff (1 s
        // doubling to 30 s), lifecycle events registered on it again, and every domain
        // announced as changed, so that each VM is looked at afresh.
        let mut wait = Duration::from_secs(1);
        loop {
            tokio::time::sleep(if self.down().is_some() {
                wait
            } else {
                Duration::from_secs(1)
            })
            .await;
            if self.down().is_none() {
                let conn = self.current();
                let alive = tokio::task::spawn_blocking(move || conn.is_alive().unwrap_or(false))
                    .await
                    .unwrap_or(false);
                if alive {
                    continue;
                }
                self.mark_down("the connection to libvirtd was lost".into());
            }
            let uri = self.uri.clone();
            match tokio::task::spawn_blocking(move || Connect::open(Some(&uri))).await {
                Ok(Ok(conn)) => {
                    *self.conn.write().expect("not poisoned") = Arc::new(conn);
                    if let Err(e) = self.register_lifecycle_events().await {
                        self.mark_down(format!("registering lifecycle events: {e}"));
                        continue;
                    }
                    *self.down.lock().expect("not poisoned") = None;
                    wait = Duration::from_secs(1);
                    tracing::warn!(uri = %self.uri, "reconnected to libvirtd");
                    // What changed while we were away is unknown: every domain is news.
                    if let Ok(domains) = self.list().await {
                        for d in domains {
                            let _ = self.events.send(d.uuid);
                        }
                    }
                }
                Ok(Err(e)) => {
                    self.mark_down(format!("cannot connect to libvirtd at {}: {e}", self.uri));
                    wait = (wait * 2).min(Duration::from_secs(30));
                }
                Err(_) => wait = (wait * 2).min(Duration::from_secs(30)),
            }
        }
    }

    fn uri(&self) -> &str {
        &self.uri
    }

    async fn node_info(&self) -> Result<NodeInfo> {
        self.call(|c| {
            let info = c.node_info()?;
            let driver = c.driver_type()?;
            Ok(NodeInfo {
                cpus: info.cpus,
                memory_bytes: info.memory * 1024,
                libvirt_version: version_string(c.lib_version()?),
                hypervisor_version: format!(
                    "{} {}",
                    driver,
                    version_string(c.hyp_version().unwrap_or(0))
                ),
                driver,
            })
        })
        .await
    }

    async fn list(&self) -> Result<Vec<DomainInfo>> {
        self.call(|c| {
            let flags =
                sys::VIR_CONNECT_LIST_DOMAINS_ACTIVE | sys::VIR_CONNECT_LIST_DOMAINS_INACTIVE;
            c.list_all_domains(flags)?.iter().map(info_of).collect()
        })
        .await
    }

    async fn lookup(&self, uuid: &str) -> Result<Option<DomainInfo>> {
        let uuid = uuid.to_string();
        self.call(move |c| match c.lookup_domain_by_uuid_string(&uuid) {
            Ok(d) => match info_of(&d) {
                Ok(i) => Ok(Some(i)),
                Err(LibvirtError::Virt(e)) if is_no_domain(&e) => Ok(None),
                Err(e) => Err(e),
            },
            Err(e) if is_no_domain(&e) => Ok(None),
            Err(e) => Err(e.into()),
        })
        .await
    }

    async fn define(&self, xml: String) -> Result<()> {
        self.call(move |c| {
            c.define_domain_xml(&xml)?;
            Ok(())
        })
        .await
    }

    async fn start(&self, uuid: &str) -> Result<()> {
        self.with_domain(uuid, |d| d.create().map(|_| ())).await
    }

    async fn shutdown(&self, uuid: &str) -> Result<()> {
        self.with_domain(uuid, |d| match d.is_active()? {
            true => d.shutdown().map(|_| ()),
            false => Ok(()),
        })
        .await
    }

    async fn destroy(&self, uuid: &str) -> Result<()> {
        self.with_domain(uuid, |d| match d.is_active()? {
            true => d.destroy().map(|_| ()),
            false => Ok(()),
        })
        .await
    }

    async fn undefine(&self, uuid: &str) -> Result<()> {
        self.with_domain(uuid, |d| {
            match d.undefine_flags(sys::VIR_DOMAIN_UNDEFINE_NVRAM) {
                // Drivers without NVRAM support (the test driver) refuse the flag.
                Err(e)
                    if e.code()
                        == virt::enumutil::Enum::Known(virt::error::ErrorNumber::InvalidArg) =>
                {
                    d.undefine()
                }
                other => other.map(|_| ()),
            }
        })
        .await
    }

    async fn migratable_xml(&self, uuid: &str) -> Result<String> {
        let uuid = uuid.to_string();
        self.call(move |c| {
            let d = c.lookup_domain_by_uuid_string(&uuid)?;
            Ok(d.xml_desc(sys::VIR_DOMAIN_XML_MIGRATABLE | sys::VIR_DOMAIN_XML_SECURE)?)
        })
        .await
    }

    async fn migrate(
        &self,
        uuid: &str,
        dest_uri: &str,
        data_uri: &str,
        dest_xml: String,
        tls: bool,
        copy_disks: Vec<String>,
        shared: bool,
    ) -> Result<()> {
        let (uuid, dest_uri, data_uri) =
            (uuid.to_string(), dest_uri.to_string(), data_uri.to_string());
        self.call(move |c| {
            let d = c.lookup_domain_by_uuid_string(&uuid)?;
            let mut flags =
                sys::VIR_MIGRATE_LIVE | sys::VIR_MIGRATE_PEER2PEER | sys::VIR_MIGRATE_PERSIST_DEST;
            if !copy_disks.is_empty() {
                // Only the named disks: the others are on storage the target shares, and
                // copying one onto itself would destroy it.
                flags |= sys::VIR_MIGRATE_NON_SHARED_INC;
            }
            if tls {
                // Memory and the disks' NBD stream, both over TLS.
                flags |= sys::VIR_MIGRATE_TLS;
            }
            if shared {
                // Pooled disks are opened with cache=none on both sides.
                flags |= sys::VIR_MIGRATE_UNSAFE;
            }
            let params = virt::domain::MigrateParameters {
                uri: Some(data_uri),
                dest_xml: Some(dest_xml),
                migrate_disks: copy_disks,
                ..Default::default()
            };
            d.migrate_to_uri3(Some(&dest_uri), params, flags)?;
            Ok(())
        })
        .await
    }

    async fn block_resize(&self, uuid: &str, disk: &str, bytes: u64) -> Result<()> {
        let (uuid, disk) = (uuid.to_string(), disk.to_string());
        self.call(move |c| {
            let d = c.lookup_domain_by_uuid_string(&uuid)?;
            d.block_resize(&disk, bytes, sys::VIR_DOMAIN_BLOCK_RESIZE_BYTES)?;
            Ok(())
        })
        .await
    }

    async fn backup(&self, uuid: &str, backup_xml: String, quiesce: bool) -> Result<Quiesce> {
        let uuid = uuid.to_string();
        self.call(move |c| {
            let d = c.lookup_domain_by_uuid_string(&uuid)?;
            let xml = std::ffi::CString::new(backup_xml)
                .map_err(|e| LibvirtError::Refused(e.to_string()))?;
            // SAFETY (both calls): a live domain handle; no mountpoint list means all.
            let frozen = if quiesce {
                match unsafe { sys::virDomainFSFreeze(d.as_ptr(), std::ptr::null_mut(), 0, 0) } {
                    n if n >= 0 => Quiesce::Frozen(n as u32),
                    _ => Quiesce::Failed(virt::error::Error::last_error().to_string()),
                }
            } else {
                Quiesce::NotAsked
            };
            // SAFETY: a live domain handle and a NUL-terminated XML string.
            let begun =
                unsafe { sys::virDomainBackupBegin(d.as_ptr(), xml.as_ptr(), std::ptr::null(), 0) };
            let refused = (begun < 0).then(virt::error::Error::last_error);
            // The job has fixed its instant (or failed): the guest runs on at once.
            if matches!(frozen, Quiesce::Frozen(_))
                && unsafe { sys::virDomainFSThaw(d.as_ptr(), std::ptr::null_mut(), 0, 0) } < 0
            {
                let e = virt::error::Error::last_error();
                tracing::warn!(%uuid, error = %e, "thawing the guest's filesystems failed");
            }
            if let Some(e) = refused {
                return Err(e.into());
            }
            // The job runs in QEMU; its end is when no job remains on the domain.
            loop {
                std::thread::sleep(Duration::from_millis(100));
                if d.job_info()?.r#type == sys::VIR_DOMAIN_JOB_NONE as i32 {
                    break;
                }
            }
            let done = d.job_stats(sys::VIR_DOMAIN_JOB_STATS_COMPLETED)?;
            if done.r#type != sys::VIR_DOMAIN_JOB_COMPLETED as i32 {
                return Err(LibvirtError::Refused(format!(
                    "the backup job ended without completing (job type {})",
                    done.r#type
                )));
            }
            Ok(frozen)
        })
        .await
    }

    async fn open_console(&self, uuid: &str) -> Result<GuestStream> {
        let uuid = uuid.to_string();
        let stream = self
            .call(move |c| {
                let d = c.lookup_domain_by_uuid_string(&uuid)?;
                let st = virt::stream::Stream::new(c, sys::VIR_STREAM_NONBLOCK)?;
                d.open_console(None, &st, sys::VIR_DOMAIN_CONSOLE_FORCE)?;
                Ok(st)
            })
            .await?;
        let (out_tx, output) = tokio::sync::mpsc::channel(64);
        let (input, in_rx) = tokio::sync::mpsc::channel(64);
        std::thread::Builder::new()
            .name("console".into())
            .spawn(move || pump(stream, out_tx, in_rx))
            .map_err(|e| LibvirtError::Refused(e.to_string()))?;
        Ok(GuestStream { output, input })
    }

    async fn open_vnc(&self, uuid: &str) -> Result<std::os::fd::OwnedFd> {
        let uuid = uuid.to_string();
        self.call(move |c| {
            let d = c.lookup_domain_by_uuid_string(&uuid)?;
            let fd = d.open_graphics_fd(0, 0)?;
            // SAFETY: libvirt hands the new descriptor over to the caller.
            Ok(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) })
        })
        .await
    }

    async fn completed_job(&self, uuid: &str) -> Result<(Option<u64>, Option<u64>)> {
        let uuid = uuid.to_string();
        self.call(move |c| {
            let d = c.lookup_domain_by_uuid_string(&uuid)?;
            let s = d.job_stats(sys::VIR_DOMAIN_JOB_STATS_COMPLETED)?;
            let bytes = s.data_processed.or(s.mem_processed);
            Ok((s.downtime, bytes))
        })
        .await
    }

    async fn domain_types(&self) -> Result<Vec<String>> {
        self.call(|c| Ok(super::domain_types_in_caps(&c.capabilities()?)))
            .await
    }

    async fn domain_capabilities(&self, virttype: &str) -> Result<String> {
        let virttype = virttype.to_string();
        self.call(move |c| {
            Ok(c.domain_capabilities(None, Some("x86_64"), None, Some(&virttype), 0)?)
        })
        .await
    }

    async fn create_transient(&self, xml: String) -> Result<String> {
        self.call(move |c| uuid_of(&c.create_domain_xml(&xml, 0)?))
            .await
    }

    async fn guest(&self, uuid: &str) -> Result<Guest> {
        let uuid = uuid.to_string();
        self.call(move |c| guest_in(c, &uuid)).await
    }

    async fn resume(&self, uuid: &str) -> Result<()> {
        self.with_domain(uuid, |d| d.resume().map(|_| ())).await
    }

    async fn abort_job(&self, uuid: &str) -> Result<()> {
        let uuid = uuid.to_string();
        self.call(move |c| {
            let d = c.lookup_domain_by_uuid_string(&uuid)?;
            // SAFETY: a valid domain pointer for the duration of the call.
            let rc = unsafe { sys::virDomainAbortJob(d.as_ptr()) };
            if rc < 0 {
                return Err(virt::error::Error::last_error().into());
            }
            Ok(())
        })
        .await
    }

    async fn addresses(&self, uuid: &str, guest_agent: bool) -> Result<Vec<Address>> {
        use crate::api::vm::AddressSource;
        let uuid = uuid.to_string();
        self.call(move |c| {
            let Ok(d) = c.lookup_domain_by_uuid_string(&uuid) else {
                return Ok(Vec::new());
            };
            if !d.is_active().unwrap_or(false) {
                return Ok(Vec::new());
            }
            let mut sources = vec![
                (
                    sys::VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_ARP,
                    AddressSource::Neighbour,
                ),
                (
                    sys::VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE,
                    AddressSource::Lease,
                ),
            ];
            if guest_agent {
                // A guest agent that hangs holds this thread no longer than this.
                // SAFETY: a live domain handle.
                unsafe { sys::virDomainAgentSetResponseTimeout(d.as_ptr(), AGENT_TIMEOUT_S, 0) };
                sources.insert(
                    0,
                    (
                        sys::VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT,
                        AddressSource::GuestAgent,
                    ),
                );
            }
            let mut out = Vec::new();
            for (src, source) in sources {
                // A source that knows nothing (no agent, no lease, no network) says so
                // as an error: it adds nothing.
                for i in d.interface_addresses(src, 0).unwrap_or_default() {
                    let Some(mac) = i.hwaddr else { continue };
                    out.extend(i.addrs.into_iter().map(|a| Address {
                        mac: mac.clone(),
                        ip: a.addr,
                        source,
                    }));
                }
            }
            Ok(out)
        })
        .await
    }

    async fn guest_exec(&self, uuid: &str, command: Vec<String>, timeout: Duration) -> Result<i64> {
        let uuid = uuid.to_string();
        self.call(move |c| {
            let d = c.lookup_domain_by_uuid_string(&uuid)?;
            let deadline = std::time::Instant::now() + timeout;
            let wait = timeout.as_secs().clamp(1, AGENT_TIMEOUT_S as u64) as i32;
            let reply = d.qemu_agent_command(&super::guest_exec_request(&command), wait, 0)?;
            let pid = super::guest_exec_pid(&reply)
                .ok_or_else(|| LibvirtError::Refused(format!("guest-exec answered {reply}")))?;
            loop {
                let reply =
                    d.qemu_agent_command(&super::guest_exec_status_request(pid), wait, 0)?;
                if let Some(code) = super::guest_exec_exited(&reply) {
                    return Ok(code);
                }
                if std::time::Instant::now() >= deadline {
                    return Err(LibvirtError::Refused(format!(
                        "the command did not end within {} s",
                        timeout.as_secs_f64()
                    )));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
        .await
    }

    async fn stats(&self) -> Result<Vec<DomainStats>> {
        self.call(|c| {
            let types = sys::VIR_DOMAIN_STATS_CPU_TOTAL
                | sys::VIR_DOMAIN_STATS_BALLOON
                | sys::VIR_DOMAIN_STATS_INTERFACE
                | sys::VIR_DOMAIN_STATS_BLOCK;
            let records =
                c.all_domain_stats(types, sys::VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE)?;
            let mut out = Vec::with_capacity(records.len());
            for r in &records {
                // SAFETY: the records stay valid until freed below; params has nparams entries.
                let rec = unsafe { &*r.ptr };
                let dom = unsafe { Domain::from_ptr(rec.dom) };
                let mut s = DomainStats {
                    uuid: dom.uuid_string().unwrap_or_default(),
                    ..Default::default()
                };
                std::mem::forget(dom); // owned by the record
                for i in 0..rec.nparams.max(0) as usize {
                    let p = unsafe { &*rec.params.add(i) };
                    let field = unsafe { CStr::from_ptr(p.field.as_ptr()) }.to_string_lossy();
                    let value = match p.type_ as u32 {
                        sys::VIR_TYPED_PARAM_ULLONG => unsafe { p.value.ul },
                        sys::VIR_TYPED_PARAM_LLONG => (unsafe { p.value.l }).max(0) as u64,
                        sys::VIR_TYPED_PARAM_UINT => u64::from(unsafe { p.value.ui }),
                        _ => continue,
                    };
                    let suffix = field.rsplit('.').next().unwrap_or_default();
                    match (field.split('.').next().unwrap_or_default(), suffix) {
                        ("cpu", "time") if field == "cpu.time" => s.cpu_time_ns = value,
                        ("balloon", "current") => s.memory_bytes = value * 1024,
                        ("block", "bytes") if field.ends_with(".rd.bytes") => {
                            s.disk_read_bytes += value
                        }
                        ("block", "bytes") if field.ends_with(".wr.bytes") => {
                            s.disk_write_bytes += value
                        }
                        ("net", "bytes") if field.ends_with(".rx.bytes") => s.net_rx_bytes += value,
                        ("net", "bytes") if field.ends_with(".tx.bytes") => s.net_tx_bytes += value,
                        _ => {}
                    }
                }
                out.push(s);
            }
            // The virt crate frees the array but not the records: hand them back to libvirt
            // in a NULL-terminated array allocated the way libvirt frees it.
            let n = records.len() + 1;
            let size = std::mem::size_of::<sys::virDomainStatsRecordPtr>();
            // SAFETY: calloc'd array of n pointers, the last left NULL; libvirt frees the
            // records and the array.
            unsafe {
                let arr = libc_calloc(n, size) as *mut sys::virDomainStatsRecordPtr;
                if !arr.is_null() {
                    for (i, r) in records.iter().enumerate() {
                        *arr.add(i) = r.ptr;
                    }
                    sys::virDomainStatsRecordListFree(arr);
                }
            }
            Ok(out)
        })
        .await
    }

    fn lifecycle_events(&self) -> tokio::sync::broadcast::Receiver<String> {
        self.events.subscribe()
    }

    async fn peek_guest(&self, uri: &str, uuid: &str) -> Result<Guest> {
        peek_guest(uri, uuid).await
    }
}

unsafe extern "C" {
    #[link_name = "calloc"]
    fn libc_calloc(n: usize, size: usize) -> *mut c_void;
}

unsafe extern "C" fn on_lifecycle(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    _event: i32,
    _detail: i32,
    opaque: *mut c_void,
) -> i32 {
    // SAFETY: opaque is the sender registered above, alive until free_sender.
    let tx = unsafe { &*(opaque as *const Sender<String>) };
    let mut buf: [std::os::raw::c_char; sys::VIR_UUID_STRING_BUFLEN as usize] =
        [0; sys::VIR_UUID_STRING_BUFLEN as usize];
    if unsafe { sys::virDomainGetUUIDString(dom, buf.as_mut_ptr()) } == 0 {
        let uuid = unsafe { CStr::from_ptr(buf.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        let _ = tx.send(uuid);
    }
    0
}

unsafe extern "C" fn free_sender(opaque: *mut c_void) {
    // SAFETY: created by Box::into_raw in lifecycle_events.
    drop(unsafe { Box::from_raw(opaque as *mut Sender<String>) });
}

/// Moves bytes between a non-blocking libvirt stream and the two channels until the
/// stream ends (the domain went away), fails, or nobody listens any more. libvirt's
/// event loop fills the stream; this polls it, resting 10 ms when nothing moved.
fn pump(
    st: virt::stream::Stream,
    out: tokio::sync::mpsc::Sender<Vec<u8>>,
    mut input: tokio::sync::mpsc::Receiver<Vec<u8>>,
) {
    use tokio::sync::mpsc::error::TryRecvError;
    let mut buf = vec![0u8; 16 * 1024];
    let mut pending: Option<(Vec<u8>, usize)> = None;
    loop {
        let mut moved = false;
        // SAFETY: a live stream and a buffer of the length given.
        let n = unsafe { sys::virStreamRecv(st.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        match n {
            n if n > 0 => {
                if out.blocking_send(buf[..n as usize].to_vec()).is_err() {
                    break;
                }
                moved = true;
            }
            -2 => {}
            _ => break,
        }
        if pending.is_none() {
            match input.try_recv() {
                Ok(b) => pending = Some((b, 0)),
                Err(TryRecvError::Empty) => {}
                Err(TryRecvError::Disconnected) => break,
            }
        }
        if let Some((b, off)) = &mut pending {
            // SAFETY: a live stream and the unsent rest of the buffer.
            let n = unsafe {
                sys::virStreamSend(st.as_ptr(), b[*off..].as_ptr().cast(), b.len() - *off)
            };
            match n {
                n if n >= 0 => {
                    *off += n as usize;
                    moved = true;
                    if *off == b.len() {
                        pending = None;
                    }
                }
                -2 => {}
                _ => break,
            }
        }
        if out.is_closed() {
            break;
        }
        if !moved {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let _ = st.abort();
}
