#!/usr/bin/env bash
# Builds the tiny real guest: Debian's cloud kernel and a busybox initramfs whose init
# prints "vmlet-guest-up" with its uptime on the serial console, then a heartbeat every
# 2 s (or powers off when the kernel command line says vmlet.poweroff).
# With vmlet.disk=DEV (e.g. vda) it loads the virtio block driver, writes
# "vmlet-marker:M" to the start of /dev/DEV when vmlet.write=M is given, prints what
# the device starts with ("vmlet-disk-read=..."), and each heartbeat carries the
# device's size as the guest sees it, in 512-byte sectors ("disk-sectors=N").
# With vmlet.qga=1 it runs Debian's QEMU guest agent (qemu-ga, with the libraries it
# links) on the org.qemu.guest_agent.0 virtio-serial port and says "vmlet-qga-up".
# With vmlet.fs=DEV (e.g. vdb) it makes an ext2 filesystem on /dev/DEV unless it holds
# one, and mounts it on /mnt: a filesystem for the guest agent to freeze.
# With vmlet.shell=1 a shell reads the serial console ("vmlet-shell-up"): what is typed
# into the console runs, and its output comes back on it.
# With vmlet.net=1 it loads the virtio network driver, asks for an address by DHCP on
# eth0 (busybox udhcpc; "vmlet-dhcp-bound ip=A") and serves "vmlet-http:M" over HTTP on
# port 80 (busybox httpd), M from vmlet.http=M ("vmlet-http-up").
#   hack/tiny-guest.sh [DIR]   writes DIR/vmlinuz and DIR/initrd.gz (default .cache/guest)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${1:-$ROOT/.cache/guest}
CACHE=${VMLET_GUEST_CACHE:-$HOME/.cache/vmlet/guest}
mkdir -p "$OUT" "$CACHE"
# Concurrent callers (parallel tests) take turns; the cache is filled once.
exec 9>"$CACHE/.lock"
flock 9

# The kernel and its virtio modules come from one package: fetched together.
MODULES="virtio virtio_ring virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk virtio_console failover net_failover virtio_net"
if [[ ! -f "$CACHE/vmlinuz" || ! -f "$CACHE/modules/virtio_net.ko" ]]; then
  work=$(mktemp -d)
  (
    cd "$work"
    apt-get download linux-image-cloud-amd64 >/dev/null 2>&1 || { apt-get update -qq && apt-get download linux-image-cloud-amd64 >/dev/null; }
    dep=$(dpkg-deb -f linux-image-cloud-amd64_*.deb Depends | tr ',' '\n' | grep -o 'linux-image-[0-9][^ ]*-cloud-amd64' | head -n1)
    apt-get download "$dep" >/dev/null
    dpkg-deb -x linux-image-[0-9]*.deb x
    cp x/boot/vmlinuz-* "$CACHE/vmlinuz.tmp"
    rm -rf "$CACHE/modules" && mkdir -p "$CACHE/modules"
    for m in $MODULES; do
      find x/lib/modules -name "$m.ko" -exec cp {} "$CACHE/modules/" \;
    done
  )
  rm -rf "$work"
  mv "$CACHE/vmlinuz.tmp" "$CACHE/vmlinuz"
fi

# The guest agent, from the same Debian release as this host: the libraries it links are
# this host's (qemu needs the same ones), copied beside it by what ldd resolves.
if [[ ! -x "$CACHE/qga/qemu-ga" ]]; then
  work=$(mktemp -d)
  (
    cd "$work"
    apt-get download qemu-guest-agent >/dev/null 2>&1 || { apt-get update -qq && apt-get download qemu-guest-agent >/dev/null; }
    dpkg-deb -x qemu-guest-agent_*.deb x
    rm -rf "$CACHE/qga.tmp" && mkdir -p "$CACHE/qga.tmp/lib"
    cp x/usr/sbin/qemu-ga "$CACHE/qga.tmp/"
    ldd x/usr/sbin/qemu-ga | grep -o '/[^ ]*' | while read -r lib; do
      cp -L "$lib" "$CACHE/qga.tmp/lib/"
    done
  )
  rm -rf "$work" "$CACHE/qga"
  mv "$CACHE/qga.tmp" "$CACHE/qga"
fi

# Rebuilt when this script (which holds the init program) changes, by content: a fresh
# clone's new file times must not force a rebuild.
stamp=$(cat "$0" "$CACHE"/modules/*.ko "$CACHE/qga/qemu-ga" | sha256sum | cut -c1-16)
if [[ ! -f "$CACHE/initrd.gz" || "$(cat "$CACHE/initrd.stamp" 2>/dev/null)" != "$stamp" ]]; then
  busybox=$(command -v busybox || echo /bin/busybox)
  [[ -x $busybox ]] || { echo "busybox-static is not installed: run hack/deps.sh" >&2; exit 1; }
  work=$(mktemp -d)
  mkdir -p "$work/bin" "$work/proc" "$work/sys" "$work/dev" "$work/lib/modules" "$work/lib64" "$work/tmp" "$work/var/run"
  cp "$busybox" "$work/bin/busybox"
  cp "$CACHE"/modules/*.ko "$work/lib/modules/"
  cp "$CACHE/qga/qemu-ga" "$work/bin/"
  cp "$CACHE"/qga/lib/* "$work/lib/"
  ln -s ../lib/ld-linux-x86-64.so.2 "$work/lib64/ld-linux-x86-64.so.2"
  cat > "$work/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
echo "vmlet-guest-up uptime=$(cut -d' ' -f1 /proc/uptime)"
if grep -q vmlet.poweroff /proc/cmdline; then
  echo "vmlet-guest-poweroff"
  poweroff -f
fi
arg() { tr ' ' '\n' < /proc/cmdline | sed -n "s/^$1=//p" | head -n1 | tr -cd 'A-Za-z0-9_-'; }
dev=$(arg vmlet.disk)
qga=$(arg vmlet.qga)
fs=$(arg vmlet.fs)
net=$(arg vmlet.net)
if [ -n "$dev" ] || [ -n "$qga" ] || [ -n "$fs" ] || [ -n "$net" ]; then
  # In dependency order (each module's depends=).
  for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk virtio_console failover net_failover virtio_net; do
    insmod /lib/modules/$m.ko || echo "vmlet-insmod-failed=$m"
  done
  mount -t devtmpfs dev /dev
fi
if [ -n "$(arg vmlet.shell)" ]; then
  grep -q " /dev " /proc/mounts || mount -t devtmpfs dev /dev
  sh </dev/ttyS0 >/dev/ttyS0 2>&1 &
  echo "vmlet-shell-up"
fi
if [ -n "$net" ]; then
  cat > /bin/dhcp-event <<'DHCP'
#!/bin/sh
case "$1" in
  deconfig) ip addr flush dev "$interface"; ip link set "$interface" up ;;
  bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" dev "$interface"
    [ -n "$router" ] && ip route add default via "${router%% *}" dev "$interface" 2>/dev/null
    echo "vmlet-dhcp-$1 ip=$ip" ;;
esac
DHCP
  chmod +x /bin/dhcp-event
  ip link set lo up
  n=0
  while [ ! -e /sys/class/net/eth0 ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done
  ip link set eth0 up
  udhcpc -i eth0 -s /bin/dhcp-event -f -t 20 -T 1 -A 2 2>/dev/null &
  mkdir -p /www
  printf 'vmlet-http:%s\n' "$(arg vmlet.http)" > /www/index.html
  httpd -p 80 -h /www
  echo "vmlet-http-up"
fi
if [ -n "$fs" ]; then
  n=0
  while [ ! -b "/dev/$fs" ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done
  mkdir -p /mnt
  mount -t ext2 "/dev/$fs" /mnt 2>/dev/null || { mke2fs -q "/dev/$fs" && mount -t ext2 "/dev/$fs" /mnt; }
  if grep -q " /mnt " /proc/mounts; then echo "vmlet-fs-mounted=$fs"; else echo "vmlet-fs-failed=$fs"; fi
fi
if [ -n "$qga" ]; then
  port=
  n=0
  while [ -z "$port" ] && [ $n -lt 100 ]; do
    for p in /sys/class/virtio-ports/*; do
      [ "$(cat "$p/name" 2>/dev/null)" = org.qemu.guest_agent.0 ] && port=/dev/${p##*/}
    done
    [ -n "$port" ] || { sleep 0.1; n=$((n+1)); }
  done
  if [ -n "$port" ]; then
    LD_LIBRARY_PATH=/lib /bin/qemu-ga -m virtio-serial -p "$port" -t /tmp &
    echo "vmlet-qga-up port=$port"
  else
    echo "vmlet-qga-missing"
  fi
fi
if [ -n "$dev" ]; then
  n=0
  while [ ! -b "/dev/$dev" ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done
  [ -b "/dev/$dev" ] || echo "vmlet-disk-missing=$dev"
  mark=$(arg vmlet.write)
  if [ -n "$mark" ] && [ -b "/dev/$dev" ]; then
    printf 'vmlet-marker:%s\n' "$mark" | dd of="/dev/$dev" bs=512 count=1 conv=sync,fsync 2>/dev/null
    sync
    echo "vmlet-disk-wrote=$mark"
  fi
  echo "vmlet-disk-read=$(dd if="/dev/$dev" bs=512 count=1 iflag=direct 2>/dev/null | head -n1 | tr -cd 'A-Za-z0-9:_-')"
fi
while true; do
  sleep 2
  if [ -n "$dev" ]; then
    echo "vmlet-guest-heartbeat uptime=$(cut -d' ' -f1 /proc/uptime) disk-sectors=$(cat /sys/class/block/$dev/size)"
  else
    echo "vmlet-guest-heartbeat uptime=$(cut -d' ' -f1 /proc/uptime)"
  fi
done
INIT
  chmod +x "$work/init"
  (cd "$work" && find . | cpio -o -H newc 2>/dev/null | gzip -9 > "$CACHE/initrd.gz.tmp")
  rm -rf "$work"
  mv "$CACHE/initrd.gz.tmp" "$CACHE/initrd.gz"
  echo "$stamp" > "$CACHE/initrd.stamp"
fi
for f in vmlinuz initrd.gz; do
  if ! cmp -s "$CACHE/$f" "$OUT/$f"; then
    cp "$CACHE/$f" "$OUT/$f.tmp.$$" && mv "$OUT/$f.tmp.$$" "$OUT/$f"
  fi
done
echo "$OUT"
