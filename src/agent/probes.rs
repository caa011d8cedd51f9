//! Readiness probes, run by the agent of the VM's node as kubelet runs a Pod's: a TCP
//! connect or an HTTP GET to the guest's address (from the node, which reaches guests on
//! its libvirt networks and bridges), or a command run in the guest by its QEMU guest
//! agent. One task per running VM with a probe; its verdict feeds the `Ready` condition
//! and, through it, the VM's endpoints in Services.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;

use super::Context;
use crate::api::VirtualMachine;
use crate::api::probe::{Probe, Scheme};

/// The verdict the status reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    pub ready: bool,
    pub reason: &'static str,
    pub message: String,
}

/// Results in a row, and the verdict they add up to: not ready until `success_threshold`
/// successes in a row, then not ready again after `failure_threshold` failures in a row.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tally {
    ready: bool,
    probed: bool,
    successes: u32,
    failures: u32,
    last_failure: Option<String>,
}

impl Tally {
    /// Counts one result; true when the verdict changed.
    pub fn record(&mut self, result: Result<(), String>, probe: &Probe) -> bool {
        let before = self.ready;
        self.probed = true;
        match result {
            Ok(()) => {
                self.successes += 1;
                self.failures = 0;
                if self.successes >= probe.success_threshold() {
                    self.ready = true;
                }
            }
            Err(why) => {
                self.failures += 1;
                self.successes = 0;
                self.last_failure = Some(why);
                if self.failures >= probe.failure_threshold() {
                    self.ready = false;
                }
            }
        }
        self.ready != before
    }

    pub fn readiness(&self) -> Readiness {
        match (self.ready, self.probed, &self.last_failure) {
            (true, _, _) => Readiness {
                ready: true,
                reason: "ProbeSucceeded",
                message: "the readiness probe succeeds".into(),
            },
            (false, false, _) => Readiness {
                ready: false,
                reason: "NotProbedYet",
                message: "the domain runs; the readiness probe has not run yet".into(),
            },
            (false, true, Some(why)) if self.failures > 0 => Readiness {
                ready: false,
                reason: "ProbeFailed",
                // No counts: the status would change (a write) at every probe.
                message: format!("the readiness probe fails: {why}"),
            },
            (false, true, _) => Readiness {
                ready: false,
                reason: "ProbeSucceeding",
                message: "the readiness probe succeeds, not yet as often in a row as \
                          successThreshold asks"
                    .into(),
            },
        }
    }
}

struct Prober {
    /// The probe it runs, as JSON: a changed probe starts a new prober.
    key: String,
    tally: Arc<Mutex<Tally>>,
    task: tokio::task::AbortHandle,
}

/// The probers of this node's VMs, by uid.
#[derive(Default)]
pub struct Probers {
    running: Mutex<HashMap<String, Prober>>,
    changes: std::sync::OnceLock<tokio::sync::broadcast::Sender<String>>,
}

impl Drop for Probers {
    fn drop(&mut self) {
        for p in self.running.get_mut().expect("not poisoned").values() {
            p.task.abort();
        }
    }
}

impl Probers {
    fn sender(&self) -> &tokio::sync::broadcast::Sender<String> {
        self.changes
            .get_or_init(|| tokio::sync::broadcast::channel(1024).0)
    }

    /// The uid of each VM whose verdict changes, from now on.
    pub fn changes(&self) -> tokio::sync::broadcast::Receiver<String> {
        self.sender().subscribe()
    }

    fn stop(&self, uid: &str) {
        if let Some(p) = self.running.lock().expect("not poisoned").remove(uid) {
            p.task.abort();
        }
    }
}

/// Keeps the VM's prober running while its domain runs (started afresh when the domain
/// was just started or the probe changed) and stopped otherwise; the verdict so far, or
/// None when the VM has no probe or does not run.
pub fn ensure(
    ctx: &Context,
    vm: &VirtualMachine,
    running: bool,
    started_now: bool,
) -> Option<Readiness> {
    let uid = vm.uid()?;
    let probe = match (&vm.spec.readiness_probe, running) {
        (Some(p), true) => p.clone(),
        _ => {
            ctx.probes.stop(&uid);
            return None;
        }
    };
    let key = serde_json::to_string(&probe).unwrap_or_default();
    let mut running = ctx.probes.running.lock().expect("not poisoned");
    if let Some(p) = running.get(&uid)
        && p.key == key
        && !started_now
        && !p.task.is_finished()
    {
        return Some(p.tally.lock().expect("not poisoned").readiness());
    }
    if let Some(old) = running.remove(&uid) {
        old.task.abort();
    }
    let tally = Arc::new(Mutex::new(Tally::default()));
    let sees = Sees {
        vms: ctx.vms.clone(),
        lv: ctx.lv.clone(),
        changes: ctx.probes.sender().clone(),
    };
    let task = tokio::spawn(probe_loop(
        sees,
        ObjectRef::from(vm),
        uid.clone(),
        probe,
        tally.clone(),
    ))
    .abort_handle();
    let readiness = tally.lock().expect("not poisoned").readiness();
    running.insert(uid, Prober { key, tally, task });
    Some(readiness)
}

/// What a prober reads and tells: the agent's VMs as cached (the address to probe), its
/// libvirt (a guest agent's command) and where verdict changes go.
struct Sees {
    vms: kube::runtime::reflector::Store<VirtualMachine>,
    lv: super::libvirt::Shared,
    changes: tokio::sync::broadcast::Sender<String>,
}

async fn probe_loop(
    sees: Sees,
    vm: ObjectRef<VirtualMachine>,
    uid: String,
    probe: Probe,
    tally: Arc<Mutex<Tally>>,
) {
    tokio::time::sleep(probe.initial_delay()).await;
    let http = reqwest::Client::builder()
        .timeout(probe.timeout())
        .redirect(reqwest::redirect::Policy::none())
        .danger_accept_invalid_certs(true)
        .build();
    loop {
        let Some(current) = sees.vms.get(&vm) else {
            return;
        };
        if current.uid().as_deref() != Some(uid.as_str()) {
            return;
        }
        let result = match &http {
            Ok(http) => run(&sees, &current, &probe, http).await,
            Err(e) => Err(e.to_string()),
        };
        let changed = tally.lock().expect("not poisoned").record(result, &probe);
        if changed {
            let _ = sees.changes.send(uid.clone());
        }
        tokio::time::sleep(probe.period()).await;
    }
}

/// The address the node probes the guest at: the first confirmed address (one the node
/// saw the guest use) of the first interface that has one, IPv4 first. A guest agent's
/// word alone never points the node's probes somewhere.
pub fn target(vm: &VirtualMachine) -> Option<std::net::IpAddr> {
    vm.status
        .as_ref()?
        .interfaces
        .iter()
        .flat_map(|i| i.confirmed_addresses.iter())
        .find_map(|ip| ip.parse().ok())
}

/// One probe: Ok when it succeeded, else why not.
async fn run(
    sees: &Sees,
    vm: &VirtualMachine,
    probe: &Probe,
    http: &reqwest::Client,
) -> Result<(), String> {
    let timeout = probe.timeout();
    if let Some(exec) = &probe.exec {
        let uid = vm.uid().unwrap_or_default();
        return match sees
            .lv
            .guest_exec(&uid, exec.command.clone(), timeout)
            .await
        {
            Ok(0) => Ok(()),
            Ok(code) => Err(format!("the command exited {code}")),
            Err(e) => Err(format!("the guest agent could not run it: {e}")),
        };
    }
    let Some(ip) = target(vm) else {
        return Err("the VM has no address the node has seen it use yet".into());
    };
    if let Some(tcp) = &probe.tcp_socket {
        let addr = std::net::SocketAddr::new(ip, tcp.port);
        return match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("tcp {addr}: {e}")),
            Err(_) => Err(format!("tcp {addr}: no answer within {timeout:?}")),
        };
    }
    if let Some(get) = &probe.http_get {
        let scheme = match get.scheme.unwrap_or_default() {
            Scheme::Http => "http",
            Scheme::Https => "https",
        };
        let addr = std::net::SocketAddr::new(ip, get.port);
        let url = format!("{scheme}://{addr}{}", get.path.as_deref().unwrap_or("/"));
        return match http.get(&url).send().await {
            Ok(r) if (200..400).contains(&r.status().as_u16()) => Ok(()),
            Ok(r) => Err(format!("GET {url}: {}", r.status())),
            Err(e) => Err(format!("GET {url}: {e}")),
        };
    }
    Err("the probe names no action".into())
}

/// How often the agent looks for a running VM's addresses while some interface that
/// can learn one has none yet.
pub const ADDRESS_POLL: Duration = Duration::from_secs(5);
/// How often it looks again once each has one: leases change, guest agents start late.
pub const ADDRESS_REFRESH: Duration = Duration::from_secs(30);

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(success: i32, failure: i32) -> Probe {
        Probe {
            success_threshold: Some(success),
            failure_threshold: Some(failure),
            ..Default::default()
        }
    }

    #[test]
    #[allow(clippy::type_complexity)] // a table
    fn thresholds_count_results_in_a_row() {
        let ok = || Ok(());
        let no = || Err("refused".to_string());
        // (thresholds, results, verdict after each, changed after each)
        let cases: Vec<((i32, i32), Vec<Result<(), String>>, Vec<bool>, Vec<bool>)> = vec![
            ((1, 3), vec![ok()], vec![true], vec![true]),
            ((1, 3), vec![no()], vec![false], vec![false]),
            (
                (2, 3),
                vec![ok(), ok()],
                vec![false, true],
                vec![false, true],
            ),
            (
                (2, 3),
                vec![ok(), no(), ok()],
                vec![false, false, false],
                vec![false; 3],
            ),
            (
                (1, 3),
                vec![ok(), no(), no(), no()],
                vec![true, true, true, false],
                vec![true, false, false, true],
            ),
            (
                (1, 3),
                vec![ok(), no(), no(), ok(), no(), no()],
                vec![true; 6],
                vec![true, false, false, false, false, false],
            ),
            (
                (1, 1),
                vec![ok(), no(), ok()],
                vec![true, false, true],
                vec![true; 3],
            ),
        ];
        for ((s, f), results, verdicts, changes) in cases {
            let p = probe(s, f);
            let mut t = Tally::default();
            for (i, r) in results.into_iter().enumerate() {
                let changed = t.record(r, &p);
                assert_eq!(t.readiness().ready, verdicts[i], "({s},{f}) step {i}");
                assert_eq!(changed, changes[i], "({s},{f}) step {i}");
            }
        }
    }

    #[test]
    fn the_verdict_says_why() {
        let p = probe(2, 1);
        let mut t = Tally::default();
        assert_eq!(t.readiness().reason, "NotProbedYet");
        t.record(Err("tcp 10.0.0.1:80: refused".into()), &p);
        let r = t.readiness();
        assert_eq!((r.ready, r.reason), (false, "ProbeFailed"));
        assert_eq!(
            r.message,
            "the readiness probe fails: tcp 10.0.0.1:80: refused"
        );
        t.record(Ok(()), &p);
        assert_eq!(t.readiness().reason, "ProbeSucceeding");
        t.record(Ok(()), &p);
        assert_eq!(t.readiness().reason, "ProbeSucceeded");
    }

    #[test]
    fn the_target_is_the_first_address_of_the_first_interface_with_one() {
        use crate::api::vm::InterfaceStatus;
        let mut vm = VirtualMachine::new("a", Default::default());
        assert_eq!(target(&vm), None);
        let iface = |ips: &[&str]| InterfaceStatus {
            name: "n".into(),
            ip_address: ips.first().map(|s| s.to_string()),
            ip_addresses: ips.iter().map(|s| s.to_string()).collect(),
            confirmed_addresses: ips.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        vm.status = Some(crate::api::VirtualMachineStatus {
            interfaces: vec![
                iface(&[]),
                iface(&["10.76.0.5", "fd00::5"]),
                iface(&["10.1.0.1"]),
            ],
            ..Default::default()
        });
        assert_eq!(target(&vm), Some("10.76.0.5".parse().unwrap()));
    }
}
