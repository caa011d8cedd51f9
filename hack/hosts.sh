#!/usr/bin/env bash
# Two real libvirt hosts on this one machine, for migration: each libvirtd runs in a
# network namespace of its own (its own address on a shared bridge) and a mount namespace
# of its own (its own /etc/libvirt, /var/lib/libvirt, /run/libvirt, logs and host UUID),
# listening on TCP without auth on its private address only.
#   hack/hosts.sh up      start both (idempotent); prints the two libvirt URIs
#   hack/hosts.sh down    stop them and remove the namespaces and the bridge
#   hack/hosts.sh status
# Host N (1, 2) is 10.77.0.N; this machine is 10.77.0.254 on bridge vmlet-br0.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATE="$ROOT/.cache/hosts"
BR=vmlet-br0
log() { printf '[hosts] %s\n' "$*" >&2; }
# A zombie (this machine's PID 1 reaps nothing) is not running.
running() { [[ -f "$1" ]] && [[ "$(ps -o stat= -p "$(cat "$1")" 2>/dev/null)" =~ ^[^Z] ]]; }

net_up() {
  ip link show "$BR" >/dev/null 2>&1 || {
    ip link add "$BR" type bridge
    ip addr add 10.77.0.254/24 dev "$BR"
    ip link set "$BR" up
  }
  for n in 1 2; do
    local ns=vmlet-h$n
    ip netns list | grep -qw "$ns" && continue
    ip netns add "$ns"
    ip link add "vmh$n" type veth peer name "vmh$n-br"
    ip link set "vmh$n" netns "$ns"
    ip link set "vmh$n-br" master "$BR"
    ip link set "vmh$n-br" up
    ip netns exec "$ns" ip addr add "10.77.0.$n/24" dev "vmh$n"
    ip netns exec "$ns" ip link set "vmh$n" up
    ip netns exec "$ns" ip link set lo up
  done
}

host_up() { # n
  local n=$1 dir="$STATE/h$1" ns=vmlet-h$1
  if running "$dir/libvirtd.pid"; then
    # Started with an older qemu.conf (QEMU as root): start it again with this one.
    grep -q 'user = "libvirt-qemu"' "$dir/etc/qemu.conf" 2>/dev/null && return 0
    log "libvirtd $n runs QEMU as root: restarting it"
    kill "$(cat "$dir/libvirtd.pid")"
    for _ in $(seq 1 100); do running "$dir/libvirtd.pid" || break; sleep 0.1; done
  fi
  mkdir -p "$dir"/{etc,lib,run,cache,log}
  cp -a /etc/libvirt/. "$dir/etc/"
  rm -rf "$dir/etc/qemu/networks/autostart" "$dir/etc/qemu/"*.xml
  cat > "$dir/etc/libvirtd.conf" <<CONF
# managed by vmlet hack/hosts.sh
listen_tls = 0
listen_tcp = 1
listen_addr = "10.77.0.$n"
auth_tcp = "none"
auth_unix_rw = "none"
host_uuid = "$(printf '7a3c0000-0000-4000-8000-%012d' "$n")"
log_outputs = "3:file:$dir/log/libvirtd.log"
CONF
  cat > "$dir/etc/qemu.conf" <<CONF
# managed by vmlet hack/hosts.sh: QEMU as Debian's libvirt-qemu user with libvirt's DAC
# driver (as users run it), console logs to files (no virtlogd)
user = "libvirt-qemu"
group = "kvm"
dynamic_ownership = 1
remember_owner = 1
stdio_handler = "file"
migration_address = "10.77.0.$n"
CONF
  log "starting libvirtd $n on 10.77.0.$n"
  # ip netns exec gives a mount namespace of its own already; the binds stay inside it.
  # Under tini as a subreaper, as in hack/libvirt.sh: exited QEMUs must be reaped.
  setsid ip netns exec "$ns" unshare -m --propagation private sh -c "
    mount --bind '$dir/etc' /etc/libvirt &&
    mount --bind '$dir/lib' /var/lib/libvirt &&
    mount --bind '$dir/run' /run/libvirt &&
    mount --bind '$dir/cache' /var/cache/libvirt &&
    mount --bind '$dir/log' /var/log/libvirt &&
    exec tini -s -- libvirtd --listen -p '$dir/libvirtd.pid'" </dev/null >>"$dir/log/stdout" 2>&1 &
  for _ in $(seq 1 100); do
    virsh -c "qemu+tcp://10.77.0.$n/system" version >/dev/null 2>&1 && {
      log "host $n ready: qemu+tcp://10.77.0.$n/system"
      return 0
    }
    sleep 0.1
  done
  log "libvirtd $n did not answer; see $dir/log/libvirtd.log"
  exit 1
}

up() {
  command -v libvirtd >/dev/null || { log "libvirtd is not installed: run hack/deps.sh"; exit 1; }
  mkdir -p /var/cache/libvirt /var/log/libvirt /var/lib/libvirt /run/libvirt
  net_up
  host_up 1
  host_up 2
  echo "qemu+tcp://10.77.0.1/system qemu+tcp://10.77.0.2/system"
}

down() {
  for n in 1 2; do
    local pid="$STATE/h$n/libvirtd.pid"
    if running "$pid"; then
      log "stopping libvirtd $n"
      # Its guests first: they live in the namespace and would hold it.
      for d in $(virsh -c "qemu+tcp://10.77.0.$n/system" list --name 2>/dev/null); do
        virsh -c "qemu+tcp://10.77.0.$n/system" destroy "$d" >/dev/null 2>&1 || true
      done
      kill "$(cat "$pid")" 2>/dev/null || true
    fi
    rm -f "$pid"
    ip netns del "vmlet-h$n" 2>/dev/null || true
  done
  ip link del "$BR" 2>/dev/null || true
}

status() {
  for n in 1 2; do
    if running "$STATE/h$n/libvirtd.pid"; then echo "host $n: up (qemu+tcp://10.77.0.$n/system)"; else echo "host $n: down"; fi
  done
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
