#!/usr/bin/env bash
# The demo: CRDs on the local control plane, the controller, an agent on this machine's
# libvirt, and the tiny guest booted as a VirtualMachine. `hack/demo.sh down` removes the
# VM and stops the controller and the agent. Expects `hack/cluster.sh up` and
# `hack/libvirt.sh up` (make demo runs both).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
export KUBECONFIG=${KUBECONFIG:-$ROOT/.cache/cluster/kubeconfig}
export PATH="$ROOT/.cache/bin:$PATH"
RUN="$ROOT/.cache/demo"
NODE=${VMLET_DEMO_NODE:-demo-node}
IMAGES=/var/lib/vmlet/images
log() { printf '\n[demo] %s\n' "$*"; }

down() {
  if kubectl get vm tiny -n default >/dev/null 2>&1; then
    log "deleting VM tiny"
    kubectl delete vm tiny -n default --wait=true --timeout=60s || true
  fi
  for p in agent controller; do
    if [[ -f "$RUN/$p.pid" ]] && kill -0 "$(cat "$RUN/$p.pid")" 2>/dev/null; then
      log "stopping the $p"
      kill "$(cat "$RUN/$p.pid")"
    fi
    rm -f "$RUN/$p.pid"
  done
}

running() { [[ -f "$RUN/$1.pid" ]] && kill -0 "$(cat "$RUN/$1.pid")" 2>/dev/null; }

if [[ "${1:-}" == "down" ]]; then down; exit 0; fi

mkdir -p "$RUN" "$IMAGES/tiny"
log "building vmlet"
cargo build --bins -q
VMLET="$ROOT/target/debug/vmlet"

log "installing the CRDs"
"$VMLET" crd | kubectl apply --server-side --force-conflicts --field-manager=vmlet-demo -f - >/dev/null
kubectl wait --for=condition=Established crd --all --timeout=60s >/dev/null

log "building the tiny guest (Debian cloud kernel + busybox initramfs)"
hack/tiny-guest.sh "$IMAGES/tiny" >/dev/null

log "registering node $NODE as a hypervisor"
kubectl apply --server-side --field-manager=vmlet-demo -f - >/dev/null <<YAML
apiVersion: v1
kind: Node
metadata:
  name: $NODE
  labels: {vmlet.dev/hypervisor: "true", kubernetes.io/hostname: $NODE}
YAML

if ! running controller; then
  log "starting the controller (log: $RUN/controller.log)"
  setsid "$VMLET" controller --metrics-addr 127.0.0.1:9465 >>"$RUN/controller.log" 2>&1 < /dev/null &
  echo $! > "$RUN/controller.pid"
fi
if ! running agent; then
  log "starting the agent (log: $RUN/agent.log)"
  setsid "$VMLET" agent --node "$NODE" --libvirt-uri qemu:///system --state-dir /var/lib/vmlet \
    --metrics-addr 127.0.0.1:9464 >>"$RUN/agent.log" 2>&1 < /dev/null &
  echo $! > "$RUN/agent.pid"
fi

log "applying examples/tiny-vm.yaml"
start=$(date +%s.%N)
kubectl apply --server-side --field-manager=vmlet-demo -n default -f examples/tiny-vm.yaml

log "waiting for the VM to be Running"
kubectl wait vm/tiny -n default --for=jsonpath='{.status.phase}'=Running --timeout=120s
running=$(date +%s.%N)
uid=$(kubectl get vm tiny -n default -o jsonpath='{.metadata.uid}')
console=/var/lib/vmlet/vms/$uid/console.log
for _ in $(seq 1 600); do grep -q vmlet-guest-up "$console" 2>/dev/null && break; sleep 0.1; done
userspace=$(date +%s.%N)
kubectl get vm -n default -o wide
kubectl get hypervisors
log "the guest's serial console ($console):"
grep -a "vmlet-guest" "$console" | head -n 3
printf '\n[demo] apply->Running %.2f s, apply->guest userspace %.2f s (accel: %s)\n' \
  "$(awk "BEGIN{print $running - $start}")" "$(awk "BEGIN{print $userspace - $start}")" \
  "$(kubectl get vm tiny -n default -o jsonpath='{.status.accel}')"
log "the VM keeps running; 'make demo-down' deletes it and stops the controller and agent"
