//! `kubectl vm ...`: the kubectl plugin (kubectl runs `kubectl-vm` found on PATH).

fn main() -> std::process::ExitCode {
    vmlet::kubectl::main()
}
