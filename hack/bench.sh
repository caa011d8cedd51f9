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
  echo "- \`cargo bench --bench scale\` against \`hack/cluster.sh up\` (release build; VMLET_BENCH_NODES, VMLET_BENCH_VMS)"
  echo
  echo "$scale"
  echo
  echo "$scheduler"
} > "$OUT"
echo "wrote $OUT" >&2
