#!/usr/bin/env bash
# Installs what a fresh Debian machine lacks to build, test and demo vmlet:
# Debian packages (libvirt, QEMU, build tools, a kernel for the demo guest) and the
# Go-built control-plane binaries. Idempotent: does nothing when all are present.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# iproute2 and util-linux: hack/hosts.sh (ip netns, unshare); fonts-dejavu-core: the
# benchmark plots' text. qemu-utils is not named: the machine may carry a newer one from backports, and apt then
# reports held broken packages. qemu-system-x86 pulls in a compatible qemu-img.
PKGS=(libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libvirt-dev qemu-system-x86
      pkg-config openssl curl busybox-static cpio iproute2 util-linux genisoimage
      fonts-dejavu-core)

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "[deps] installing: ${missing[*]}" >&2
  SUDO=""; [[ $(id -u) -eq 0 ]] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

command -v cargo >/dev/null || { echo "[deps] cargo (Rust >= 1.89) is required" >&2; exit 1; }
command -v go >/dev/null || { echo "[deps] go (>= 1.26) is required to build the control plane" >&2; exit 1; }
"$ROOT/hack/cluster.sh" build
