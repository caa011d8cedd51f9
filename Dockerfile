# The single vmlet image: `vmlet` (controller, agent, crd) and `kubectl-vm`.
# No image can be built on the machines vmlet is developed on (no Docker engine, no
# registry); this file is what a machine with one would use:
#   docker build -t REGISTRY/vmlet:0.1.0 . && docker push REGISTRY/vmlet:0.1.0
FROM docker.io/library/rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends libvirt-dev pkg-config \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# Cargo.toml declares them: cargo refuses the manifest without their files.
COPY benches ./benches
RUN cargo build --release --locked --bins

# glibc base with the libvirt client library (the agent links libvirt.so) and the tools
# the agent runs: qemu-img for overlays and image checks, qemu-system-x86 for the KVM probe.
FROM docker.io/library/debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends \
        libvirt0 qemu-utils qemu-system-x86 ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/vmlet /usr/local/bin/vmlet
COPY --from=build /src/target/release/kubectl-vm /usr/local/bin/kubectl-vm
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/vmlet"]
