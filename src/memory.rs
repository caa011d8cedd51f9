//! Gives freed heap back to the operating system. A watch cache's churn (every event is
//! decoded into fresh allocations, the old copy freed) leaves glibc's arenas holding
//! free pages that count as resident memory until malloc reuses them; a node or a
//! cluster with 10,000 VMs turns that into tens of MiB of RSS that the caches do not
//! use. `malloc_trim` returns them (it also releases free pages inside the heap, not
//! only at its top).

use std::time::Duration;

/// How often a long-running process trims: cheap (a walk over the arenas' free lists).
pub const TRIM_EVERY: Duration = Duration::from_secs(10);

/// Trims now; true when memory was returned.
pub fn trim() -> bool {
    // SAFETY: malloc_trim only walks and releases the allocator's own free memory.
    unsafe { libc::malloc_trim(0) == 1 }
}

/// Trims every [`TRIM_EVERY`], forever.
pub async fn trim_loop() {
    let mut tick = tokio::time::interval(TRIM_EVERY);
    loop {
        tick.tick().await;
        tokio::task::spawn_blocking(trim).await.ok();
    }
}
