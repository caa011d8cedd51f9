#!/usr/bin/env bash
# Installs what a fresh Debian machine lacks to build, test and demo vmlet:
# the Debian packages named in hack/programs.tsv (every program the code, tests and scripts
# run), the libraries and data below, and the Go-built control-plane binaries.
# Idempotent: does nothing when all are present.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# Not programs, so not in the table: libvirt's QEMU driver (loaded by libvirtd), libvirt's
# headers (the virt crate links them), the benchmark plots' font, the CNI plugins
# (/usr/lib/cni: bridge, host-local, loopback) the real node of hack/node.sh uses, and
# dnsmasq, which libvirtd runs as the DHCP server of its networks (the networking test's).
EXTRA=(libvirt-daemon-driver-qemu libvirt-dev fonts-dejavu-core containernetworking-plugins dnsmasq-base)
# qemu-utils (qemu-img) goes in a second apt-get: named together with qemu-system-x86 on a
# machine that carries a newer qemu-utils from backports, apt reports held broken packages;
# after qemu-system-x86 it resolves to the matching version.
LATE=(qemu-utils)

mapfile -t TABLE < <(awk -F'\t' '!/^#/ && $2=="deb" {print $3}' "$ROOT/hack/programs.tsv" | sort -u)

missing() {
  local p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || echo "$p"
  done
}
install() {
  (($#)) || return 0
  echo "[deps] installing: $*" >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "$@" >&2
}

SUDO=""; [[ $(id -u) -eq 0 ]] || SUDO=sudo
first=() late=()
for p in "${TABLE[@]}" "${EXTRA[@]}"; do
  [[ " ${LATE[*]} " == *" $p "* ]] || first+=("$p")
done
mapfile -t need < <(missing "${first[@]}")
mapfile -t need_late < <(missing "${LATE[@]}")
if ((${#need[@]} + ${#need_late[@]})); then
  $SUDO apt-get update -qq
  install "${need[@]}"
  install "${need_late[@]}"
fi

command -v cargo >/dev/null || { echo "[deps] cargo (Rust >= 1.89) is required" >&2; exit 1; }
command -v go >/dev/null || { echo "[deps] go (>= 1.26) is required to build the control plane" >&2; exit 1; }
"$ROOT/hack/cluster.sh" build
