//! The VM Pod's container process: a binary of its own, linked against nothing but libc,
//! so that what it holds resident per VM stays near the kernel's minimum (the `vmlet`
//! binary maps libvirt and its 50-odd libraries).

fn main() {
    vmlet_placeholder::run()
}

#[path = "../placeholder.rs"]
mod vmlet_placeholder;
