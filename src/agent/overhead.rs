//! What each VM costs this host beyond its guest memory, as the agent publishes it in its
//! Hypervisor's status (`vmOverhead`) for the scheduler to charge. The defaults are
//! measured (`cargo bench --bench overhead`; docs/scheduling.md has the figures) and
//! rounded up; `--vm-overhead FIXED,PER_VCPU,PER_GIB` replaces them.

use super::node::Accel;
use crate::api::overhead::Overhead;
use crate::api::quantity::ParseError;

const MI: u64 = 1 << 20;

/// QEMU's own resident memory beyond guest RAM, measured for the tiny guest under TCG
/// (107-116 MiB over six shapes; the fit's fixed part is 107 MiB) and rounded up.
const QEMU_MIB: u64 = 112;

/// Measured and rounded up, per accelerator. TCG's fixed part adds its translation
/// cache in full, which the renderer bounds (`<tb-cache>`; unbounded, QEMU sizes it at
/// an eighth of host memory, up to 1 GiB per VM): the tiny guest fills little of it, a
/// real one may fill it all. KVM has no translation cache; its figure is QEMU's measured
/// under TCG, as KVM guests do not boot on the machines these were measured on. Per
/// vCPU and per GiB: KubeVirt's 8Mi per vCPU, and 8Mi per GiB where the measurement
/// found 2 and 1.2 (page tables, and dirty bitmaps while a migration copies).
pub fn default_for(accel: Accel) -> Overhead {
    let fixed = match accel {
        Accel::Tcg => QEMU_MIB + TB_CACHE_MIB,
        Accel::Kvm => QEMU_MIB,
    };
    Overhead {
        fixed: fixed * MI,
        per_vcpu: 8 * MI,
        per_gib: 8 * MI,
    }
}

/// The TCG translation cache each guest gets, in MiB.
pub const TB_CACHE_MIB: u64 = 128;

/// The formula from the flag (`auto`: the measured default for `accel`) and where it
/// came from, as the status says.
pub fn choose(flag: &str, accel: Accel) -> Result<(Overhead, String), ParseError> {
    if flag == "auto" {
        return Ok((default_for(accel), format!("measured ({})", accel.as_str())));
    }
    Ok((Overhead::parse(flag)?, "--vm-overhead".to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_is_the_accelerators_and_a_flag_replaces_it() {
        let (o, source) = choose("auto", Accel::Tcg).unwrap();
        assert_eq!(o, default_for(Accel::Tcg));
        assert_eq!(source, "measured (tcg)");
        let (o, source) = choose("100Mi,1Mi,2Mi", Accel::Kvm).unwrap();
        assert_eq!((o.fixed, o.per_vcpu, o.per_gib), (100 * MI, MI, 2 * MI));
        assert_eq!(source, "--vm-overhead");
        assert!(choose("lots", Accel::Kvm).is_err());
    }
}
