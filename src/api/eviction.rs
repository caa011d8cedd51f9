//! How a VM leaves a node that is drained (by `kubectl vm drain`, or by the eviction of
//! its VM Pod through `kubectl drain`), from its evictionStrategy and where its data is.
//! Pure: the plugin and the controller both act on it.

use super::VirtualMachine;
use super::vm::{EvictionStrategy, Phase};

/// How one VM leaves the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    Migrate,
    ShutDown,
    Stay(Stay),
}

/// Why a VM stays on the node being drained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stay {
    /// evictionStrategy: None.
    Strategy,
    /// Its disks hold data only this node has, and it cannot be live-migrated.
    LocalData,
}

/// The plan for a VM: its strategy (default LiveMigrate), and a VM that is not running
/// has nothing to migrate, so it moves by the shutdown path, which only VMs without
/// node-local data (or that accept new disks) may take.
/// `shared` says which of its volumes are on a storage pool (a local volume never moves).
pub fn plan(vm: &VirtualMachine, shared: &dyn Fn(&str) -> bool) -> Plan {
    let running = vm.status.as_ref().and_then(|s| s.phase) == Some(Phase::Running);
    let local_volume = vm.spec.volumes().any(|v| !shared(v));
    match vm
        .spec
        .eviction_strategy
        .unwrap_or(EvictionStrategy::LiveMigrate)
    {
        EvictionStrategy::None => Plan::Stay(Stay::Strategy),
        EvictionStrategy::LiveMigrate if running && !local_volume => Plan::Migrate,
        EvictionStrategy::LiveMigrate | EvictionStrategy::Shutdown
            if !vm.spec.may_restart_elsewhere(shared) =>
        {
            Plan::Stay(Stay::LocalData)
        }
        EvictionStrategy::LiveMigrate | EvictionStrategy::Shutdown => Plan::ShutDown,
    }
}

pub fn why_stays(vm: &VirtualMachine, why: Stay, shared: &dyn Fn(&str) -> bool) -> String {
    match why {
        Stay::Strategy => "evictionStrategy None".into(),
        Stay::LocalData => format!(
            "disk(s) {} hold data only this node has: live-migrate it while it runs \
             (evictionStrategy LiveMigrate), or set failoverPolicy: RestartWithNewDisks \
             (a local volume stays with its node)",
            vm.spec.node_local_data(shared).join(", ")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn vm(strategy: Option<&str>, phase: &str) -> VirtualMachine {
        let mut spec = json!({"memory": "64Mi"});
        if let Some(s) = strategy {
            spec["evictionStrategy"] = json!(s);
        }
        let mut vm = VirtualMachine::new("a", serde_json::from_value(spec).unwrap());
        vm.status = Some(serde_json::from_value(json!({"phase": phase})).unwrap());
        vm
    }

    #[test]
    fn plans_follow_strategy_and_state() {
        assert_eq!(plan(&vm(None, "Running"), &|_| false), Plan::Migrate);
        assert_eq!(
            plan(&vm(Some("LiveMigrate"), "Stopped"), &|_| false),
            Plan::ShutDown
        );
        assert_eq!(
            plan(&vm(Some("Shutdown"), "Running"), &|_| false),
            Plan::ShutDown
        );
        assert_eq!(
            plan(&vm(Some("None"), "Running"), &|_| false),
            Plan::Stay(Stay::Strategy)
        );
        // Node-local data: live migration carries it; a shutdown would leave it behind.
        let with_disk = |strategy: Option<&str>, phase: &str, policy: Option<&str>| {
            let mut v = vm(strategy, phase);
            v.spec.disks = vec![
                serde_json::from_value(json!({"name": "d", "blank": {"size": "1Gi"}})).unwrap(),
            ];
            v.spec.failover_policy = policy.map(|p| serde_json::from_value(json!(p)).unwrap());
            plan(&v, &|_| false)
        };
        assert_eq!(with_disk(None, "Running", None), Plan::Migrate);
        assert_eq!(
            with_disk(None, "Stopped", None),
            Plan::Stay(Stay::LocalData)
        );
        assert_eq!(
            with_disk(Some("Shutdown"), "Running", None),
            Plan::Stay(Stay::LocalData)
        );
        assert_eq!(
            with_disk(Some("Shutdown"), "Running", Some("RestartWithNewDisks")),
            Plan::ShutDown
        );
    }
}
