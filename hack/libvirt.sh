#!/usr/bin/env bash
# Runs libvirtd, virtlogd and virtlockd on a machine without systemd (this one, CI).
#   hack/libvirt.sh up     start them if they are not running (idempotent)
#   hack/libvirt.sh down   stop the ones this script started
# A daemon that was already running is used as it is and never stopped.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATE="$ROOT/.cache/libvirt"
log() { printf '[libvirt] %s\n' "$*" >&2; }

# A zombie (this machine's PID 1 reaps nothing) is not running.
running() { [[ -f "$1" ]] && [[ "$(ps -o stat= -p "$(cat "$1")" 2>/dev/null)" =~ ^[^Z] ]]; }

configure() {
  mkdir -p /var/log/libvirt /var/run/libvirt /var/lib/libvirt /var/lib/vmlet/images
  getent group kvm >/dev/null || groupadd -r kvm
  getent group libvirt-qemu >/dev/null || groupadd -r libvirt-qemu
  getent passwd libvirt-qemu >/dev/null || useradd -r -g kvm -d /var/lib/libvirt -s /usr/sbin/nologin libvirt-qemu
  # What Debian's udev rule does on a real host (KERNEL=="kvm", GROUP="kvm", MODE="0660"):
  # QEMU's user reaches KVM through its group. Without it libvirt probes QEMU's
  # capabilities again on every start (about 15 s each here).
  if [[ -c /dev/kvm ]]; then chgrp kvm /dev/kvm && chmod 0660 /dev/kvm; fi
  # QEMU runs as Debian's own user for it (libvirt-qemu, group kvm), never as root;
  # libvirt's DAC driver chowns each file a domain needs to that user while it runs and
  # gives it back after (dynamic_ownership, remember_owner). This is what users get.
  local conf=/etc/libvirt/qemu.conf want
  want=$(cat <<CONF
# managed by vmlet hack/libvirt.sh v3 (original kept as qemu.conf.vmlet-orig)
user = "libvirt-qemu"
group = "kvm"
dynamic_ownership = 1
remember_owner = 1
# One writer per disk, whatever agents and controller believe: virtlockd holds a lease
# on every disk a running domain uses (exclusive when writable, shared when read-only),
# taken on the disk file itself, so on a shared pool it holds across nodes too.
lock_manager = "lockd"
CONF
)
  # No lockspace directory: the lease is an fcntl lock on each disk file, where its data
  # is. A domain whose disks cannot be leased does not start.
  printf '%s\n' "# managed by vmlet hack/libvirt.sh" "auto_disk_leases = 1" "require_lease_for_disks = 1" \
    > /etc/libvirt/qemu-lockd.conf
  if [[ "$(cat "$conf" 2>/dev/null)" != "$want" ]]; then
    [[ -f "$conf" && ! -f "$conf.vmlet-orig" ]] && ! grep -q "managed by vmlet" "$conf" && cp "$conf" "$conf.vmlet-orig"
    printf '%s\n' "$want" > "$conf"
    # A running daemon reads qemu.conf only when it starts.
    if running /run/libvirtd.pid; then
      log "qemu.conf changed: restarting libvirtd"
      kill "$(cat /run/libvirtd.pid)"
      for _ in $(seq 1 100); do running /run/libvirtd.pid || break; sleep 0.1; done
    fi
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
  if ! running /run/virtlockd.pid; then
    log "starting virtlockd"
    virtlockd -d -p /run/virtlockd.pid
    touch "$STATE/started-virtlockd"
  fi
  if ! running /run/libvirtd.pid; then
    log "starting libvirtd"
    # Under tini as a subreaper: QEMU daemonizes, and an orphaned QEMU that exits must be
    # reaped by someone. This machine's PID 1 reaps nothing, and libvirtd waits for a
    # killed capability-probe QEMU to vanish (a zombie never does): it hung that way.
    setsid tini -s -- libvirtd -p /run/libvirtd.pid </dev/null >>/var/log/libvirt/libvirtd.stdout 2>&1 &
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
  stop virtlockd /run/virtlockd.pid
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
