#!/usr/bin/env bash
# Runs libvirtd and virtlogd on a machine without systemd (this one, CI).
#   hack/libvirt.sh up     start them if they are not running (idempotent)
#   hack/libvirt.sh down   stop the ones this script started
# A daemon that was already running is used as it is and never stopped.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATE="$ROOT/.cache/libvirt"
log() { printf '[libvirt] %s\n' "$*" >&2; }

running() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

configure() {
  mkdir -p /var/log/libvirt /var/run/libvirt /var/lib/libvirt /var/lib/vmlet/images
  getent group kvm >/dev/null || groupadd -r kvm
  getent group libvirt-qemu >/dev/null || groupadd -r libvirt-qemu
  getent passwd libvirt-qemu >/dev/null || useradd -r -g kvm -d /var/lib/libvirt -s /usr/sbin/nologin libvirt-qemu
  # A root-run test host: QEMU runs as root, no relabelling, no security driver.
  local conf=/etc/libvirt/qemu.conf
  if ! grep -q "managed by vmlet hack/libvirt.sh" "$conf" 2>/dev/null; then
    [[ -f "$conf" && ! -f "$conf.vmlet-orig" ]] && cp "$conf" "$conf.vmlet-orig"
    cat > "$conf" <<CONF
# managed by vmlet hack/libvirt.sh (original kept as qemu.conf.vmlet-orig)
user = "root"
group = "root"
dynamic_ownership = 0
security_driver = "none"
CONF
  fi
}

up() {
  command -v libvirtd >/dev/null || { log "libvirtd is not installed: run hack/deps.sh"; exit 1; }
  mkdir -p "$STATE"
  configure
  if ! running /run/virtlogd.pid; then
    log "starting virtlogd"
    virtlogd -d -p /run/virtlogd.pid
    touch "$STATE/started-virtlogd"
  fi
  if ! running /run/libvirtd.pid; then
    log "starting libvirtd"
    libvirtd -d -p /run/libvirtd.pid
    touch "$STATE/started-libvirtd"
  fi
  # After a crash libvirtd first reconnects to every QEMU it left running: give it time.
  for _ in $(seq 1 300); do
    virsh -c qemu:///system version >/dev/null 2>&1 && { log "libvirtd ready"; return 0; }
    sleep 0.1
  done
  log "libvirtd did not answer; see /var/log/libvirt/libvirtd.log"
  exit 1
}

stop() { # name pidfile
  if [[ -f "$STATE/started-$1" ]] && running "$2"; then
    log "stopping $1"
    kill "$(cat "$2")" 2>/dev/null || true
  fi
  rm -f "$STATE/started-$1"
}

down() {
  stop libvirtd /run/libvirtd.pid
  stop virtlogd /run/virtlogd.pid
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
