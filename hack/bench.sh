#!/usr/bin/env bash
# make bench: runs the benchmarks and writes docs/benchmarks.md (method, machine,
# command lines, tables). Benchmarks print numbers; nothing here fails on a timing.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
OUT=docs/benchmarks.md
scheduler=$(cargo bench -q --bench scheduler 2>/dev/null)
# Scale needs the local control plane (make bench starts it).
scale=$(VMLET_BENCH_NODES=${VMLET_BENCH_NODES:-100} VMLET_BENCH_VMS=${VMLET_BENCH_VMS:-1000} \
  RUST_LOG=error cargo bench -q --bench scale 2>/dev/null)
footprint=$(RUST_LOG=error cargo bench -q --bench footprint 2>/dev/null)
# Real boot: the e2e test times apply -> guest userspace beside virsh define && start of
# the same XML in the same run; three runs, one line each.
boots=""
for i in 1 2 3; do
  line=$(cargo test -q --release --test e2e_qemu tiny_guest_boots_to_userspace_and_is_cleaned_up \
    -- --nocapture 2>/dev/null | grep '^e2e boot' || echo "run $i failed")
  boots+="| $i | ${line#e2e boot } |"$'\n'
done
{
  echo "# Benchmarks"
  echo
  echo "Written by \`make bench\` (hack/bench.sh) on $(date -u +%Y-%m-%d)."
  echo
  echo "## Machine"
  echo
  echo "- CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //') ($(nproc) cores)"
  echo "- Memory: $(free -g | awk '/Mem:/ {print $2}') GiB"
  echo "- Kernel: $(uname -r); $(rustc --version)"
  echo
  echo "## Commands"
  echo
  echo "- \`cargo bench --bench scheduler\` (release build, pure scheduler code, fixed seeds)"
  echo "- \`cargo bench --bench scale\` against \`hack/cluster.sh up\` (release build; VMLET_BENCH_NODES, VMLET_BENCH_VMS, VMLET_BENCH_RATE)"
  echo "- \`cargo bench --bench footprint\` (release \`vmlet\` binary as separate processes; VMLET_BENCH_CONTROLLER_VMS)"
  echo "- \`cargo test --release --test e2e_qemu tiny_guest_boots_to_userspace_and_is_cleaned_up -- --nocapture\`, three times (needs \`hack/libvirt.sh up\`)"
  echo
  echo "$scale"
  echo
  echo "$footprint"
  echo
  echo "## Real boot"
  echo
  echo "The tiny guest (hack/tiny-guest.sh) under QEMU on qemu:///system, from apply to the guest's"
  echo "first userspace line on its serial console, beside \`virsh define && virsh start\` of the same"
  echo "domain XML (disks stripped) in the same run. Goal: ratio <= 1.3."
  echo
  echo "| run | result |"
  echo "|---|---|"
  printf '%s' "$boots"
  echo
  echo "$scheduler"
} > "$OUT"
echo "wrote $OUT" >&2
