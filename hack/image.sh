#!/usr/bin/env bash
# The vmlet image, built without a Docker engine or a registry: a Debian root filesystem
# from Debian's packages (mmdebstrap), the release binaries as a second layer, put
# together as an OCI image (umoci) and written as archives (skopeo). It is the image the
# Dockerfile describes (same base release, packages, paths, user and entrypoint), so a
# machine with Docker and one without run the same thing.
#   hack/image.sh build [TAG]    .cache/image/vmlet-TAG.oci.tar and .docker.tar (TAG: dev)
#   hack/image.sh import [TAG]   load it into the local node's containerd (hack/node.sh)
#   hack/image.sh push REF [TAG] copy it to a registry: skopeo copy ... docker://REF
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT="$ROOT/.cache/image"
SOCK=/run/vmlet-node/containerd.sock
# What the agent runs beside libvirt's client library (hack/programs.tsv lists them).
PACKAGES=libvirt0,qemu-utils,ca-certificates
SUITE=bookworm
MIRROR=${VMLET_DEBIAN_MIRROR:-http://deb.debian.org/debian}
log() { printf '[image] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# The base layer, rebuilt only when what goes into it changes.
base() {
  local key
  key=$( { echo "$PACKAGES $SUITE $MIRROR"; sed -n '/^base()/,/^}/p' "$0"; } | sha256sum | cut -c1-16)
  BASE="$OUT/base-$key.tar"
  [[ -s "$BASE" ]] && return
  log "assembling the Debian $SUITE root filesystem ($PACKAGES)"
  rm -rf "$OUT"/base-*.tar "$OUT/partial.tar"
  # No documentation, manuals or translations; apt's lists are not kept. (mmdebstrap
  # picks its output format from the file name: it must end in .tar.)
  mmdebstrap --variant=minbase --include="$PACKAGES" \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
    "$SUITE" "$OUT/partial.tar" "$MIRROR" >"$OUT/mmdebstrap.log" 2>&1 ||
    { tail -n 20 "$OUT/mmdebstrap.log" >&2; die "mmdebstrap failed; see $OUT/mmdebstrap.log"; }
  mv "$OUT/partial.tar" "$BASE"
}

build() {
  local tag=$1
  for p in mmdebstrap umoci skopeo; do
    command -v "$p" >/dev/null || die "$p is not installed: run hack/deps.sh"
  done
  mkdir -p "$OUT"
  local t0=$SECONDS
  log "cargo build --release"
  (cd "$ROOT" && cargo build --release --locked --bins &&
    cargo build --release --locked --manifest-path placeholder/Cargo.toml --target-dir target/placeholder) \
    >"$OUT/cargo.log" 2>&1 ||
    { tail -n 30 "$OUT/cargo.log" >&2; die "cargo build failed; see $OUT/cargo.log"; }
  base
  local d
  d=$(mktemp -d)
  trap 'rm -rf "$d"' RETURN
  mkdir -p "$d/bins/usr/local/bin"
  for b in vmlet kubectl-vm kubectl_complete-vm; do
    install -m 0755 "$ROOT/target/release/$b" "$d/bins/usr/local/bin/$b"
    strip "$d/bins/usr/local/bin/$b"
  done
  install -m 0755 "$ROOT/target/placeholder/release/vmlet-placeholder" "$d/bins/usr/local/bin/vmlet-placeholder"
  strip "$d/bins/usr/local/bin/vmlet-placeholder"
  # Owned by root, with fixed times: the layer depends only on the binaries.
  tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$d/bins" -cf "$d/bins.tar" .
  umoci init --layout "$d/oci"
  umoci new --image "$d/oci:$tag"
  umoci raw add-layer --image "$d/oci:$tag" "$BASE"
  umoci raw add-layer --image "$d/oci:$tag" "$d/bins.tar"
  umoci config --image "$d/oci:$tag" \
    --config.entrypoint /usr/local/bin/vmlet --config.user 65532:65532 \
    --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --config.label org.opencontainers.image.source=https://github.com/vmlet/vmlet \
    --config.label "org.opencontainers.image.revision=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)" \
    --architecture amd64 --os linux
  rm -f "$OUT/vmlet-$tag.oci.tar" "$OUT/vmlet-$tag.docker.tar"
  skopeo copy --quiet "oci:$d/oci:$tag" "oci-archive:$OUT/vmlet-$tag.oci.tar:vmlet:$tag"
  skopeo copy --quiet "oci:$d/oci:$tag" "docker-archive:$OUT/vmlet-$tag.docker.tar:vmlet:$tag"
  log "vmlet:$tag in $((SECONDS - t0)) s: $(du -m "$OUT/vmlet-$tag.docker.tar" | cut -f1) MiB uncompressed ($OUT/vmlet-$tag.oci.tar)"
}

import() {
  local tag=$1 f="$OUT/vmlet-$1.docker.tar"
  [[ -s "$f" ]] || die "no $f: run hack/image.sh build $tag"
  [[ -S "$SOCK" ]] || die "the local node is not running: run hack/node.sh up"
  ctr --address "$SOCK" -n k8s.io images import "$f" >/dev/null
  log "imported vmlet:$tag into the node's containerd (docker.io/library/vmlet:$tag)"
}

case "${1:-}" in
  build) build "${2:-dev}" ;;
  import) import "${2:-dev}" ;;
  push)
    [[ -n "${2:-}" ]] || die "usage: $0 push REGISTRY/vmlet:TAG [TAG]"
    skopeo copy "oci-archive:$OUT/vmlet-${3:-dev}.oci.tar" "docker://$2" ;;
  *) echo "usage: $0 build [TAG] | import [TAG] | push REF [TAG]" >&2; exit 2 ;;
esac
