# The single vmlet image: `vmlet` (controller, agent, crd), `vmlet-placeholder` (the VM
# Pods' container), `kubectl-vm` and its completion helper `kubectl_complete-vm`.
# With Docker:  docker build -t REGISTRY/vmlet:0.1.0 . && docker push REGISTRY/vmlet:0.1.0
# Without Docker or a registry (Debian's mmdebstrap, umoci, skopeo): `make image` builds
# the same image (hack/image.sh; tests/dockerfile.rs keeps the two in step).
FROM docker.io/library/rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends libvirt-dev pkg-config \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# Cargo.toml declares them: cargo refuses the manifest without their files.
COPY benches ./benches
RUN cargo build --release --locked --bins
# The VM Pods' container: a crate of its own (no std, panic = abort, static).
COPY placeholder ./placeholder
RUN cargo build --release --locked --manifest-path placeholder/Cargo.toml --target-dir target/placeholder

# glibc base with the libvirt client library (the agent links libvirt.so) and the tool
# the agent runs: qemu-img for overlays and image checks. No QEMU: guests, and the KVM
# probe, run in the host's QEMU under libvirtd.
FROM docker.io/library/debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends \
        libvirt0 qemu-utils ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/vmlet /usr/local/bin/vmlet
COPY --from=build /src/target/placeholder/release/vmlet-placeholder /usr/local/bin/vmlet-placeholder
COPY --from=build /src/target/release/kubectl-vm /usr/local/bin/kubectl-vm
COPY --from=build /src/target/release/kubectl_complete-vm /usr/local/bin/kubectl_complete-vm
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/vmlet"]
