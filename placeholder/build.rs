// Linked on its own: no C runtime, no libc, no dynamic loader.
fn main() {
    for arg in ["-nostartfiles", "-nostdlib", "-static", "-Wl,--gc-sections"] {
        println!("cargo:rustc-link-arg-bin=vmlet-placeholder={arg}");
    }
}
