#!/usr/bin/env bash
# The demo (`make demo`): installs what is missing, starts the local control plane and
# libvirt, runs the controller and an agent on this machine, and boots the tiny guest as
# a VirtualMachine. When a step fails it says which one and why (the accel chosen, the
# VM's conditions and Events, the agent's log, the guest's console) and exits non-zero.
#   hack/demo.sh         run it
#   hack/demo.sh down    delete the VM and stop the controller and the agent
# VMLET_DEMO_ACCEL=tcg|kvm|auto (default auto) is passed to the agent as --accel.
set -eEuo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
export KUBECONFIG=${KUBECONFIG:-$ROOT/.cache/cluster/kubeconfig}
export PATH="$ROOT/.cache/bin:$PATH"
RUN="$ROOT/.cache/demo"
NODE=${VMLET_DEMO_NODE:-demo-node}
ACCEL=${VMLET_DEMO_ACCEL:-auto}
IMAGES=/var/lib/vmlet/images
T0=$(date +%s.%N)
log() { printf '\n[demo] %s\n' "$*"; }
elapsed() { awk "BEGIN{printf \"%.1f\", $(date +%s.%N) - $1}"; }

# A zombie (this machine's PID 1 reaps nothing) is not running.
running() { [[ -f "$RUN/$1.pid" ]] && [[ "$(ps -o stat= -p "$(cat "$RUN/$1.pid")" 2>/dev/null)" =~ ^[^Z] ]]; }

down() {
  if kubectl get vm tiny -n default >/dev/null 2>&1; then
    log "deleting VM tiny"
    kubectl delete vm tiny -n default --wait=true --timeout=60s || true
  fi
  for p in agent controller; do
    if running "$p"; then
      log "stopping the $p"
      kill "$(cat "$RUN/$p.pid")"
    fi
    rm -f "$RUN/$p.pid"
  done
  if virsh -c qemu:///system net-info vmlet-demo >/dev/null 2>&1; then
    log "removing the libvirt network vmlet-demo"
    virsh -c qemu:///system net-destroy vmlet-demo >/dev/null || true
  fi
  # The demo's node goes with its agent: a labelled Node whose heartbeat stopped would
  # count as a lost hypervisor for any controller that runs later (make test).
  if kubectl get node "$NODE" >/dev/null 2>&1; then
    log "removing node $NODE"
    kubectl delete node "$NODE" --ignore-not-found >/dev/null
    kubectl delete hypervisor "$NODE" --ignore-not-found >/dev/null
    kubectl delete lease -n kube-node-lease "vmlet-$NODE" --ignore-not-found >/dev/null
  fi
}

if [[ "${1:-}" == "down" ]]; then down; exit 0; fi

STEP="starting"
declare -A LOG_START=()
step() { STEP=$1; log "$1"; }

# Everything a person needs to see when a step fails, then a non-zero exit.
explain() {
  local rc=$? uid
  trap - ERR
  # A failure inside $(...) reaches the script's own trap too: explain once, there.
  ((BASH_SUBSHELL == 0)) || exit "$rc"
  set +e
  printf '\n[demo] FAILED at step: %s (exit %s)\n' "$STEP" "$rc" >&2
  if kubectl get hypervisor "$NODE" >/dev/null 2>&1; then
    printf '\n[demo] node %s: accel %s (%s)\n' "$NODE" \
      "$(kubectl get hypervisor "$NODE" -o jsonpath='{.status.accel}')" \
      "$(kubectl get hypervisor "$NODE" -o jsonpath='{.status.accelReason}')" >&2
  fi
  if kubectl get vm tiny -n default >/dev/null 2>&1; then
    printf '\n[demo] VM tiny: phase %s; conditions:\n' \
      "$(kubectl get vm tiny -n default -o jsonpath='{.status.phase}')" >&2
    kubectl get vm tiny -n default -o jsonpath='{range .status.conditions[*]}  {.type}={.status} {.reason}: {.message}{"\n"}{end}' >&2
    uid=$(kubectl get vm tiny -n default -o jsonpath='{.metadata.uid}')
    printf '\n[demo] its Events:\n' >&2
    kubectl get events -n default --field-selector "involvedObject.uid=$uid" \
      --sort-by=.lastTimestamp -o custom-columns=TYPE:.type,REASON:.reason,MESSAGE:.message 2>&1 | tail -n 10 >&2
    if [[ -n "$uid" && -f /var/lib/vmlet/vms/$uid/console.log ]]; then
      printf '\n[demo] the guest console (last 15 lines of /var/lib/vmlet/vms/%s/console.log):\n' "$uid" >&2
      tail -n 15 "/var/lib/vmlet/vms/$uid/console.log" >&2
    fi
  fi
  for p in agent controller; do
    # Only logs of this run: before the step that starts them, they are an older run's.
    if [[ -v "LOG_START[$p]" && -s "$RUN/$p.log" ]]; then
      printf '\n[demo] last lines of the %s log (%s):\n' "$p" "$RUN/$p.log" >&2
      tail -n "+$((${LOG_START[$p]:-0} + 1))" "$RUN/$p.log" | tail -n 15 >&2
    fi
  done
  if grep -qs "address already in use" "$ROOT"/.cache/cluster/logs/*.log; then
    cat >&2 <<HINT

[demo] A port the control plane needs is taken: another control plane runs on this
       machine (another vmlet checkout's? stop it there with hack/cluster.sh down).
HINT
  fi
  # Only a VM that was applied can have met its accelerator.
  if kubectl get vm tiny -n default >/dev/null 2>&1; then
    cat >&2 <<HINT

[demo] If the guest never printed a line, its accelerator may be the cause: force TCG
       (QEMU's software CPU, slower but works everywhere) with
         make demo-down && VMLET_DEMO_ACCEL=tcg make demo
HINT
  fi
  exit "$rc"
}
trap explain ERR

mkdir -p "$RUN" "$IMAGES/tiny"
step "installing what is missing (hack/deps.sh)"
hack/deps.sh
step "starting the control plane (hack/cluster.sh up)"
hack/cluster.sh up
step "starting libvirt (hack/libvirt.sh up)"
hack/libvirt.sh up

step "building vmlet"
cargo build --bins -q
VMLET="$ROOT/target/debug/vmlet"

step "installing the CRDs"
"$VMLET" crd | kubectl apply --server-side --force-conflicts --field-manager=vmlet-demo -f - >/dev/null
kubectl wait --for=condition=Established crd --all --timeout=60s >/dev/null

step "building the tiny guest (Debian cloud kernel + busybox initramfs)"
hack/tiny-guest.sh "$IMAGES/tiny" >/dev/null

step "defining the libvirt network vmlet-demo (10.75.0.0/24, DHCP, no route out)"
# Isolated: libvirt's dnsmasq hands out addresses and the node reaches the guests; no
# forwarding, so guests reach nothing beyond this machine.
if ! virsh -c qemu:///system net-info vmlet-demo >/dev/null 2>&1; then
  virsh -c qemu:///system net-create /dev/stdin >/dev/null <<'XML'
<network>
  <name>vmlet-demo</name>
  <bridge name='vmletdemo0' stp='off'/>
  <ip address='10.75.0.1' netmask='255.255.255.0'>
    <dhcp><range start='10.75.0.100' end='10.75.0.200'/></dhcp>
  </ip>
</network>
XML
fi

step "registering node $NODE as a hypervisor"
kubectl apply --server-side --field-manager=vmlet-demo -f - >/dev/null <<YAML
apiVersion: v1
kind: Node
metadata:
  name: $NODE
  labels: {vmlet.dev/hypervisor: "true", kubernetes.io/hostname: $NODE}
YAML

step "starting the controller and the agent (--accel $ACCEL)"
# Logs are appended across runs: a failure shows only this run's lines.
for p in agent controller; do
  LOG_START[$p]=0
  [[ -f "$RUN/$p.log" ]] && LOG_START[$p]=$(wc -l < "$RUN/$p.log")
done
if ! running controller; then
  setsid "$VMLET" controller --metrics-addr 127.0.0.1:9465 >>"$RUN/controller.log" 2>&1 < /dev/null &
  echo $! > "$RUN/controller.pid"
fi
if ! running agent; then
  # The Hypervisor is the agent's report: a stale one from an earlier run would answer
  # for the agent that is only starting.
  kubectl delete hypervisor "$NODE" --ignore-not-found >/dev/null
  setsid "$VMLET" agent --node "$NODE" --libvirt-uri qemu:///system --state-dir /var/lib/vmlet \
    --accel "$ACCEL" --metrics-addr 127.0.0.1:9464 >>"$RUN/agent.log" 2>&1 < /dev/null &
  echo $! > "$RUN/agent.pid"
fi
for _ in $(seq 1 300); do
  [[ -n "$(kubectl get hypervisor "$NODE" -o jsonpath='{.status.accel}' 2>/dev/null)" ]] && break
  running agent || { echo "the agent exited" >&2; false; }
  sleep 0.2
done
printf '[demo] node %s uses %s: %s\n' "$NODE" \
  "$(kubectl get hypervisor "$NODE" -o jsonpath='{.status.accel}')" \
  "$(kubectl get hypervisor "$NODE" -o jsonpath='{.status.accelReason}')"

step "applying examples/tiny-vm.yaml"
start=$(date +%s.%N)
kubectl apply --server-side --field-manager=vmlet-demo -n default -f examples/tiny-vm.yaml

step "waiting for the VM to be Running"
phase=""
for _ in $(seq 1 600); do
  phase=$(kubectl get vm tiny -n default -o jsonpath='{.status.phase}')
  [[ "$phase" == Running || "$phase" == Failed ]] && break
  sleep 0.2
done
[[ "$phase" == Running ]] || { echo "the VM is ${phase:-without a phase} after 120 s" >&2; false; }
running_at=$(date +%s.%N)

step "waiting for the guest's first console line"
uid=$(kubectl get vm tiny -n default -o jsonpath='{.metadata.uid}')
console=/var/lib/vmlet/vms/$uid/console.log
for _ in $(seq 1 600); do grep -q vmlet-guest-up "$console" 2>/dev/null && break; sleep 0.1; done
grep -q vmlet-guest-up "$console" 2>/dev/null ||
  { echo "the guest printed no line within 60 s of Running" >&2; false; }
userspace_at=$(date +%s.%N)

step "waiting for the guest's address and readiness (DHCP, then its HTTP probe)"
ip=""
for _ in $(seq 1 600); do
  ip=$(kubectl get vm tiny -n default -o jsonpath='{.status.interfaces[0].confirmedAddresses[0]}')
  ready=$(kubectl get vm tiny -n default -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')
  [[ -n "$ip" && "$ready" == True ]] && break
  sleep 0.2
done
[[ -n "$ip" ]] || { echo "the VM showed no address within 120 s of its first console line" >&2; false; }
[[ "$ready" == True ]] || { echo "the VM has $ip but is not Ready (its HTTP probe)" >&2; false; }
ready_at=$(date +%s.%N)

trap - ERR
kubectl get vm -n default -o wide
kubectl get hypervisors -o wide
log "the guest's serial console ($console):"
grep -a "vmlet-guest" "$console" | head -n 3
log "the Service tiny-web's EndpointSlice (kept by the controller):"
kubectl get endpointslices -n default -l kubernetes.io/service-name=tiny-web
log "curl http://$ip/ (the address in the VM's status):"
curl -s -m 5 "http://$ip/" || echo "(no answer)"
printf '\n[demo] apply->Running %s s, apply->guest userspace %s s, apply->Ready with an address %s s (accel: %s)\n' \
  "$(awk "BEGIN{printf \"%.2f\", $running_at - $start}")" \
  "$(awk "BEGIN{printf \"%.2f\", $userspace_at - $start}")" \
  "$(awk "BEGIN{printf \"%.2f\", $ready_at - $start}")" \
  "$(kubectl get vm tiny -n default -o jsonpath='{.status.accel}')"
log "the VM keeps running; 'make demo-down' deletes it and stops the controller and agent"
printf '[demo] make demo wall time: %s s\n' "$(elapsed "$T0")"
