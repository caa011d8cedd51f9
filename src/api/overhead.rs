//! Host memory a VM costs beyond its guest RAM: QEMU itself (binary, libraries, device
//! models, I/O buffers, under TCG its translation cache), per vCPU (thread stacks, vCPU
//! state) and per GiB of guest memory (page tables, dirty bitmaps). The agent publishes
//! its formula in its Hypervisor's status; the scheduler and the agent's `allocated` both
//! charge it, so a node filled to its allocatable memory does not over-commit the host.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::quantity::{Bytes, ParseError, parse_bytes};

const GIB: u128 = 1 << 30;

/// overhead(VM) = fixed + perVcpu x vCPUs + perGiB x guest memory in GiB (rounded up to
/// a byte), as KubeVirt sizes virt-launcher's overhead.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VmOverhead {
    /// Per VM whatever its size, e.g. 160Mi.
    pub fixed: String,
    /// Per vCPU, e.g. 8Mi.
    pub per_vcpu: String,
    /// Per GiB of guest memory, e.g. 8Mi.
    #[serde(rename = "perGiB")]
    pub per_gib: String,
    /// Where the figures come from: measured for an accelerator, or the agent's flag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

/// The formula in bytes, for arithmetic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Overhead {
    pub fixed: u64,
    pub per_vcpu: u64,
    pub per_gib: u64,
}

impl Overhead {
    /// What `vms` VMs with `vcpus` vCPUs and `guest` bytes of guest memory between them
    /// cost the host beyond their guest memory. Linear, so a node's total is the sum of
    /// its VMs' (up to a byte of rounding each).
    pub fn of(&self, vms: u64, vcpus: i64, guest: u64) -> u64 {
        let per_gib = (u128::from(self.per_gib) * u128::from(guest)).div_ceil(GIB);
        let total = u128::from(self.fixed) * u128::from(vms)
            + u128::from(self.per_vcpu) * u128::from(vcpus.max(0) as u64)
            + per_gib;
        u64::try_from(total).unwrap_or(u64::MAX)
    }

    /// The status form.
    pub fn to_status(self, source: &str) -> VmOverhead {
        VmOverhead {
            fixed: Bytes(self.fixed).to_string(),
            per_vcpu: Bytes(self.per_vcpu).to_string(),
            per_gib: Bytes(self.per_gib).to_string(),
            source: Some(source.to_string()),
        }
    }

    /// Parses `FIXED,PER_VCPU,PER_GIB` (quantities, e.g. `160Mi,8Mi,8Mi`).
    pub fn parse(s: &str) -> Result<Overhead, ParseError> {
        let parts: Vec<&str> = s.split(',').map(str::trim).collect();
        let [fixed, per_vcpu, per_gib] = parts[..] else {
            return Err(ParseError(s.to_string()));
        };
        Ok(Overhead {
            fixed: parse_bytes(fixed)?,
            per_vcpu: parse_bytes(per_vcpu)?,
            per_gib: parse_bytes(per_gib)?,
        })
    }
}

impl TryFrom<&VmOverhead> for Overhead {
    type Error = ParseError;
    fn try_from(s: &VmOverhead) -> Result<Overhead, ParseError> {
        Ok(Overhead {
            fixed: parse_bytes(&s.fixed)?,
            per_vcpu: parse_bytes(&s.per_vcpu)?,
            per_gib: parse_bytes(&s.per_gib)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MI: u64 = 1 << 20;

    #[test]
    fn the_formula_by_example() {
        let o = Overhead {
            fixed: 160 * MI,
            per_vcpu: 8 * MI,
            per_gib: 8 * MI,
        };
        // (vms, vcpus, guest) -> overhead
        let table: [(u64, i64, u64, u64); 5] = [
            (0, 0, 0, 0),
            (1, 1, 512 * MI, 160 * MI + 8 * MI + 4 * MI),
            (1, 4, 16 << 30, 160 * MI + 32 * MI + 128 * MI),
            // Two VMs of 1 vCPU and 1Gi: twice one.
            (2, 2, 2 << 30, 2 * (160 * MI + 8 * MI + 8 * MI)),
            // A byte of guest memory costs a byte of overhead, rounded up.
            (1, 0, 1, 160 * MI + 1),
        ];
        for (vms, vcpus, guest, want) in table {
            assert_eq!(o.of(vms, vcpus, guest), want, "{vms} {vcpus} {guest}");
        }
    }

    #[test]
    fn parses_and_round_trips_through_the_status() {
        let o = Overhead::parse("160Mi, 8Mi,2Mi").unwrap();
        assert_eq!(o.per_gib, 2 * MI);
        let s = o.to_status("flag");
        assert_eq!(s.fixed, "160Mi");
        assert_eq!(Overhead::try_from(&s).unwrap(), o);
        for bad in ["", "1Mi,2Mi", "1Mi,2Mi,3Mi,4Mi", "x,1Mi,1Mi"] {
            assert!(Overhead::parse(bad).is_err(), "{bad}");
        }
    }
}
