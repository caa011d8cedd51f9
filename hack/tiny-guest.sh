#!/usr/bin/env bash
# Builds the tiny real guest: Debian's cloud kernel and a busybox initramfs whose init
# prints "vmlet-guest-up" with its uptime on the serial console, then a heartbeat every
# 2 s (or powers off when the kernel command line says vmlet.poweroff).
#   hack/tiny-guest.sh [DIR]   writes DIR/vmlinuz and DIR/initrd.gz (default .cache/guest)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${1:-$ROOT/.cache/guest}
CACHE=${VMLET_GUEST_CACHE:-$HOME/.cache/vmlet/guest}
mkdir -p "$OUT" "$CACHE"
# Concurrent callers (parallel tests) take turns; the cache is filled once.
exec 9>"$CACHE/.lock"
flock 9

if [[ ! -f "$CACHE/vmlinuz" ]]; then
  work=$(mktemp -d)
  (
    cd "$work"
    apt-get download linux-image-cloud-amd64 >/dev/null 2>&1 || { apt-get update -qq && apt-get download linux-image-cloud-amd64 >/dev/null; }
    dep=$(dpkg-deb -f linux-image-cloud-amd64_*.deb Depends | tr ',' '\n' | grep -o 'linux-image-[0-9][^ ]*-cloud-amd64' | head -n1)
    apt-get download "$dep" >/dev/null
    dpkg-deb -x linux-image-[0-9]*.deb x
    cp x/boot/vmlinuz-* "$CACHE/vmlinuz.tmp"
  )
  rm -rf "$work"
  mv "$CACHE/vmlinuz.tmp" "$CACHE/vmlinuz"
fi

# Rebuilt when this script (which holds the init program) changes, by content: a fresh
# clone's new file times must not force a rebuild.
stamp=$(sha256sum "$0" | cut -c1-16)
if [[ ! -f "$CACHE/initrd.gz" || "$(cat "$CACHE/initrd.stamp" 2>/dev/null)" != "$stamp" ]]; then
  busybox=$(command -v busybox || echo /bin/busybox)
  [[ -x $busybox ]] || { echo "busybox-static is not installed: run hack/deps.sh" >&2; exit 1; }
  work=$(mktemp -d)
  mkdir -p "$work/bin" "$work/proc" "$work/sys" "$work/dev"
  cp "$busybox" "$work/bin/busybox"
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
while true; do
  sleep 2
  echo "vmlet-guest-heartbeat uptime=$(cut -d' ' -f1 /proc/uptime)"
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
