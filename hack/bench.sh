#!/usr/bin/env bash
# make bench: runs the benchmarks and writes docs/benchmarks.md (method, machine,
# command lines, tables). Benchmarks print numbers; nothing here fails on a timing.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
OUT=docs/benchmarks.md
scheduler=$(cargo bench -q --bench scheduler 2>/dev/null)
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
  echo
  echo "$scheduler"
} > "$OUT"
echo "wrote $OUT" >&2
