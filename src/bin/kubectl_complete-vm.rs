//! `kubectl_complete-vm`: kubectl (>= 1.26) runs it to complete `kubectl vm ...`
//! (install it beside kubectl-vm).

fn main() -> std::process::ExitCode {
    vmlet::kubectl::complete_main()
}
