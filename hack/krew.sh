#!/usr/bin/env bash
# Release archives of `kubectl vm` for krew: dist/kubectl-vm_vVERSION_OS_ARCH.tar.gz with
# the files krew/vm.yaml lists, and dist/vm.yaml with their URL and sha256.
#   hack/krew.sh VERSION URL_BASE     (builds the release binaries when missing)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VERSION=${1:?usage: hack/krew.sh VERSION URL_BASE}
URL_BASE=${2:?usage: hack/krew.sh VERSION URL_BASE}
DIST=${DIST:-$ROOT/dist}
os=linux
case "$(uname -m)" in
  x86_64) arch=amd64 ;;
  aarch64) arch=arm64 ;;
  *) echo "krew.sh: no krew platform for $(uname -m)" >&2; exit 1 ;;
esac
if [[ ! -x $ROOT/target/release/kubectl-vm || ! -x $ROOT/target/release/kubectl_complete-vm ]]; then
  (cd "$ROOT" && cargo build --release --locked --bin kubectl-vm --bin kubectl_complete-vm)
fi
mkdir -p "$DIST"
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
install -m 0755 "$ROOT/target/release/kubectl-vm" "$ROOT/target/release/kubectl_complete-vm" "$stage/"
strip "$stage/kubectl-vm" "$stage/kubectl_complete-vm"
install -m 0644 "$ROOT/README.md" "$stage/README.md"
archive="$DIST/kubectl-vm_v${VERSION}_${os}_${arch}.tar.gz"
# Fixed owner, order and times: the same binaries give the same archive.
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$stage" -cf - \
  kubectl-vm kubectl_complete-vm README.md | gzip -n >"$archive"
sha=$(sha256sum "$archive" | cut -d' ' -f1)
sed -e "s|@VERSION@|$VERSION|g" -e "s|@URL_BASE@|$URL_BASE|g" \
    -e "s|@SHA256_${os}_${arch}@|$sha|g" "$ROOT/krew/vm.yaml" | grep -v '^#' >"$DIST/vm.yaml"
echo "$archive"
echo "$DIST/vm.yaml"
