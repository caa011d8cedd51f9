//! The VM Pod's container (the `vmlet-placeholder` binary). It holds the VM's place in Kubernetes (requests, volumes,
//! network namespace) while QEMU runs under the node's libvirtd, so it does nothing but
//! wait to be stopped: no runtime, no threads, no allocation after start.

/// Blocks until SIGTERM or SIGINT, then exits 0. As PID 1 of its container, a process
/// without handlers ignores SIGTERM; waiting for the signal synchronously needs none.
pub fn run() -> ! {
    // SAFETY: plain libc calls on a signal set that lives on this stack; the signals are
    // blocked before the wait, as sigwait(3) requires.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        let mut sig = 0;
        libc::sigwait(&set, &mut sig);
    }
    std::process::exit(0)
}
