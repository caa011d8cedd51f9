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

# A CA and, per host, a certificate for 10.77.0.N used both as server (its libvirtd's TLS
# listener, its QEMU receiving a migration) and as client (its libvirtd and QEMU sending
# one): libvirt's `pkipath` layout (cacert.pem, servercert.pem, serverkey.pem,
# clientcert.pem, clientkey.pem) plus QEMU's (ca-cert.pem, server-cert.pem, ...), the same
# files under both names. Keys are root:kvm 0640: QEMU runs as libvirt-qemu (group kvm).
pki() { # n
  local n=$1 ca="$STATE/pki-ca" dir="$STATE/h$1/pki"
  if [[ ! -f "$ca/cacert.pem" ]]; then
    mkdir -p "$ca"
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=vmlet test hosts CA" \
      -keyout "$ca/cakey.pem" -out "$ca/cacert.pem" 2>/dev/null
  fi
  [[ -f "$dir/servercert.pem" ]] && return 0
  mkdir -p "$dir"
  openssl req -newkey rsa:2048 -nodes -subj "/CN=10.77.0.$n" \
    -keyout "$dir/serverkey.pem" -out "$dir/host.csr" 2>/dev/null
  printf 'subjectAltName=IP:10.77.0.%s\nextendedKeyUsage=serverAuth,clientAuth\n' "$n" > "$dir/ext.cnf"
  openssl x509 -req -in "$dir/host.csr" -CA "$ca/cacert.pem" -CAkey "$ca/cakey.pem" \
    -CAcreateserial -days 3650 -extfile "$dir/ext.cnf" -out "$dir/servercert.pem" 2>/dev/null
  cp "$ca/cacert.pem" "$dir/cacert.pem"
  cp "$dir/servercert.pem" "$dir/clientcert.pem"
  cp "$dir/serverkey.pem" "$dir/clientkey.pem"
  for f in cacert:ca-cert servercert:server-cert serverkey:server-key clientcert:client-cert clientkey:client-key; do
    cp "$dir/${f%%:*}.pem" "$dir/${f##*:}.pem"
  done
  rm -f "$dir/host.csr" "$dir/ext.cnf"
  chgrp -R kvm "$dir" && chmod 0750 "$dir" && chmod 0640 "$dir"/*.pem
}

host_up() { # n
  local n=$1 dir="$STATE/h$1" ns=vmlet-h$1
  if running "$dir/libvirtd.pid"; then
    # Started with an older configuration (no TLS, no lock manager): start it again.
    grep -q 'lock_manager' "$dir/etc/qemu.conf" 2>/dev/null && return 0
    log "libvirtd $n runs an older configuration: restarting it"
    kill "$(cat "$dir/libvirtd.pid")"
    for _ in $(seq 1 100); do running "$dir/libvirtd.pid" || break; sleep 0.1; done
  fi
  mkdir -p "$dir"/{etc,lib,run,cache,log}
  pki "$n"
  cp -a /etc/libvirt/. "$dir/etc/"
  rm -rf "$dir/etc/qemu/networks/autostart" "$dir/etc/qemu/"*.xml
  cat > "$dir/etc/libvirtd.conf" <<CONF
# managed by vmlet hack/hosts.sh
# TCP for the tests' and agents' own connections (a private bridge); TLS, with client
# certificates, for the migration connections between the hosts.
listen_tls = 1
listen_tcp = 1
listen_addr = "10.77.0.$n"
ca_file = "$dir/pki/cacert.pem"
cert_file = "$dir/pki/servercert.pem"
key_file = "$dir/pki/serverkey.pem"
tls_no_verify_certificate = 0
auth_tls = "none"
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
# Guest memory and disks in flight go over TLS (VIR_MIGRATE_TLS), client certificates
# required on both ends.
migrate_tls_x509_cert_dir = "$dir/pki"
migrate_tls_x509_verify = 1
# One writer per disk across the hosts: this host's virtlockd leases each disk file
# itself (an fcntl lock where the data is), which the other host's virtlockd sees.
lock_manager = "lockd"
CONF
  printf '%s\n' "# managed by vmlet hack/hosts.sh" "auto_disk_leases = 1" "require_lease_for_disks = 1" \
    > "$dir/etc/qemu-lockd.conf"
  log "starting libvirtd $n on 10.77.0.$n"
  # ip netns exec gives a mount namespace of its own already; the binds stay inside it.
  # Under tini as a subreaper, as in hack/libvirt.sh: exited QEMUs must be reaped.
  setsid ip netns exec "$ns" unshare -m --propagation private sh -c "
    mount --bind '$dir/etc' /etc/libvirt &&
    mount --bind '$dir/lib' /var/lib/libvirt &&
    mount --bind '$dir/run' /run/libvirt &&
    mount --bind '$dir/cache' /var/cache/libvirt &&
    mount --bind '$dir/log' /var/log/libvirt &&
    { [ -f '$dir/virtlockd.pid' ] && kill -0 \$(cat '$dir/virtlockd.pid') 2>/dev/null ||
      virtlockd -d -p '$dir/virtlockd.pid'; } &&
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
  echo "migration: qemu+tls://10.77.0.N/system?pkipath=$STATE/hN/pki"
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
    local lockd="$STATE/h$n/virtlockd.pid"
    if running "$lockd"; then kill "$(cat "$lockd")" 2>/dev/null || true; fi
    rm -f "$lockd"
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
