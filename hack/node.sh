#!/usr/bin/env bash
# A real worker node on this machine, registered with the local control plane
# (hack/cluster.sh): kubelet (built with the control plane, hack/cluster.sh build),
# Debian's containerd and runc, the CNI plugins (bridge, host-local, loopback).
#   hack/node.sh up      start it (idempotent) and wait until the Node is Ready
#   hack/node.sh down    stop what this script started and remove the Node
#   hack/node.sh status
# The Node is $NODE (not labelled a hypervisor until an agent runs there: a labelled
# Node without an agent would count as a lost hypervisor for every controller) at $NODE_IP on a bridge
# interface of its own (a bridge: this kernel has no dummy links): kubelet refuses a loopback node IP (no address in the Node's
# status, no `kubectl logs`). Pods get 10.79.0.0/24 on the bridge vmlet-cni0.
# What this machine needs and why (docs/environment facts): cgroup v1 (hybrid) needs
# failCgroupV1: false; the sandbox lacks CAP_SYS_RESOURCE, so containerd must not write
# negative oom_score_adj (restrict_oom_score_adj); no registry is reachable, so the pause
# image is built here from busybox and imported.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATE="$ROOT/.cache/node"
RUN=/run/vmlet-node
NODE=${VMLET_NODE_NAME:-vmlet-node}
NODE_IP=10.78.0.1
POD_CIDR=10.79.0.0/24
SERVICE_CIDR=10.96.0.0/16 # hack/cluster.sh's
PKI="$ROOT/.cache/cluster/pki"
BIN="$ROOT/.cache/bin"
SOCK="$RUN/containerd.sock"
PAUSE=vmlet.dev/pause:local
export KUBECONFIG=${KUBECONFIG:-$ROOT/.cache/cluster/kubeconfig}
log() { printf '[node] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
# A zombie (this machine's PID 1 reaps nothing) is not running.
running() { [[ -f "$1" ]] && [[ "$(ps -o stat= -p "$(cat "$1")" 2>/dev/null)" =~ ^[^Z] ]]; }

net_up() {
  ip link show vmlet-node0 >/dev/null 2>&1 || {
    ip link add vmlet-node0 type bridge
    ip addr add "$NODE_IP/32" dev vmlet-node0
    ip link set vmlet-node0 up
  }
  # The Pods' bridge exists before the first Pod, so that it can take route_localnet.
  ip link show vmlet-cni0 >/dev/null 2>&1 || {
    ip link add vmlet-cni0 type bridge
    ip link set vmlet-cni0 up
  }
  service_net_up
}

# Pods (and host-network Pods such as the agent) reach the API server the standard way,
# through the `kubernetes` Service's cluster IP (KUBERNETES_SERVICE_HOST, which kubelet
# sets). This node has no kube-proxy: its Endpoints cannot name the API server, which
# listens on loopback only, and Endpoints refuse loopback addresses. So this script writes
# the one rule kube-proxy would make for that Service (cluster IP:443 -> the API server),
# with kube-proxy's guard for DNAT to loopback: route_localnet on the Pods' bridge, and a
# drop of any other packet from that bridge to 127.0.0.0/8.
service_net_up() {
  local svc_ip port
  svc_ip=$(kubectl get service kubernetes -n default -o jsonpath='{.spec.clusterIP}')
  port=$(kubectl config view --minify -o jsonpath='{.clusters[0].cluster.server}' | sed 's/.*://')
  [[ -n "$svc_ip" && -n "$port" ]] || die "cannot read the kubernetes Service or the API server's port"
  # The service range goes to this node's bridge, never out of the machine, whether or
  # not the rules below are in place.
  ip route replace "$SERVICE_CIDR" dev vmlet-node0
  sysctl -qw net.ipv4.conf.vmlet-cni0.route_localnet=1
  iptables -t nat -N VMLET-SERVICES 2>/dev/null || iptables -t nat -F VMLET-SERVICES
  iptables -t nat -A VMLET-SERVICES -d "$svc_ip/32" -p tcp --dport 443 \
    -j DNAT --to-destination "127.0.0.1:$port"
  for chain in PREROUTING OUTPUT; do
    iptables -t nat -C "$chain" -j VMLET-SERVICES 2>/dev/null || iptables -t nat -I "$chain" -j VMLET-SERVICES
  done
  iptables -N VMLET-FIREWALL 2>/dev/null || iptables -F VMLET-FIREWALL
  iptables -A VMLET-FIREWALL -i vmlet-cni0 -d 127.0.0.0/8 \
    -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP
  iptables -C INPUT -j VMLET-FIREWALL 2>/dev/null || iptables -I INPUT -j VMLET-FIREWALL
  # Pods talk to this machine only: nothing from their bridge is forwarded elsewhere.
  iptables -N VMLET-FORWARD 2>/dev/null || iptables -F VMLET-FORWARD
  iptables -A VMLET-FORWARD -i vmlet-cni0 ! -o vmlet-cni0 -j DROP
  iptables -C FORWARD -j VMLET-FORWARD 2>/dev/null || iptables -I FORWARD -j VMLET-FORWARD
}

service_net_down() {
  for chain in PREROUTING OUTPUT; do
    iptables -t nat -D "$chain" -j VMLET-SERVICES 2>/dev/null || true
  done
  iptables -t nat -F VMLET-SERVICES 2>/dev/null || true
  iptables -t nat -X VMLET-SERVICES 2>/dev/null || true
  iptables -D INPUT -j VMLET-FIREWALL 2>/dev/null || true
  iptables -F VMLET-FIREWALL 2>/dev/null || true
  iptables -X VMLET-FIREWALL 2>/dev/null || true
  iptables -D FORWARD -j VMLET-FORWARD 2>/dev/null || true
  iptables -F VMLET-FORWARD 2>/dev/null || true
  iptables -X VMLET-FORWARD 2>/dev/null || true
  ip route del "$SERVICE_CIDR" dev vmlet-node0 2>/dev/null || true
}

# The kubelet's client certificate: CN=system:node:NAME, O=system:nodes, signed by the
# cluster CA, so that the Node authorizer and NodeRestriction treat it as that node.
kubelet_pki() {
  # Kept while the cluster's CA signed it; a control plane made anew (cluster.sh up
  # --fresh) has a new CA, and the old certificate would never register the node.
  if [[ -f "$STATE/kubelet.kubeconfig" ]] &&
    openssl verify -CAfile "$PKI/ca.crt" "$STATE/kubelet-client.crt" >/dev/null 2>&1; then
    return
  fi
  # A kubelet still running with the old one starts again with the new one.
  stop "$RUN/kubelet.pid"
  mkdir -p "$STATE"
  openssl req -newkey rsa:2048 -nodes -subj "/O=system:nodes/CN=system:node:$NODE" \
    -keyout "$STATE/kubelet-client.key" -out "$STATE/kubelet-client.csr" 2>/dev/null
  printf 'extendedKeyUsage=clientAuth\n' > "$STATE/client.ext"
  openssl x509 -req -in "$STATE/kubelet-client.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" \
    -CAcreateserial -days 3650 -extfile "$STATE/client.ext" -out "$STATE/kubelet-client.crt" 2>/dev/null
  local server
  server=$(kubectl config view --minify -o jsonpath='{.clusters[0].cluster.server}')
  cat > "$STATE/kubelet.kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters:
- name: local
  cluster: {server: "$server", certificate-authority: "$PKI/ca.crt"}
users:
- name: kubelet
  user: {client-certificate: "$STATE/kubelet-client.crt", client-key: "$STATE/kubelet-client.key"}
contexts:
- name: kubelet
  context: {cluster: local, user: kubelet}
current-context: kubelet
KC
}

containerd_up() {
  running "$RUN/containerd.pid" && return
  mkdir -p "$RUN" "$STATE/containerd" "$STATE/cni"
  cat > "$STATE/cni/10-vmlet.conflist" <<CNI
{"cniVersion": "1.0.0", "name": "vmlet-pods", "plugins": [
  {"type": "bridge", "bridge": "vmlet-cni0", "isGateway": true, "isDefaultGateway": true, "ipMasq": false,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "$POD_CIDR"}]],
            "dataDir": "$STATE/cni-ipam"}},
  {"type": "loopback"}]}
CNI
  local r
  for r in _default docker.io registry.k8s.io quay.io ghcr.io; do
    mkdir -p "$STATE/registries/$r"
    # containerd 1.6 refuses a hosts.toml without a host table ("invalid `host` tree").
    printf 'server = "http://127.0.0.1:9"\n[host."http://127.0.0.1:9"]\n  capabilities = ["pull", "resolve"]\n' \
      > "$STATE/registries/$r/hosts.toml"
  done
  cat > "$STATE/containerd.toml" <<TOML
version = 2
root = "$STATE/containerd/root"
state = "$RUN/state"
[grpc]
  address = "$SOCK"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
  # No registry is reachable, and none may be tried (this machine sends nothing beyond
  # itself): every pull goes to a closed local port. Images come in by import
  # (hack/image.sh import); Pods name them with imagePullPolicy Never or IfNotPresent.
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "$STATE/registries"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$STATE/cni"
TOML
  log "starting containerd"
  setsid tini -s -- containerd --config "$STATE/containerd.toml" \
    </dev/null >>"$STATE/containerd.log" 2>&1 &
  echo $! > "$RUN/containerd.tini.pid"
  for _ in $(seq 1 100); do
    ctr --address "$SOCK" version >/dev/null 2>&1 && break
    sleep 0.1
  done
  ctr --address "$SOCK" version >/dev/null 2>&1 || die "containerd did not answer; see $STATE/containerd.log"
  pgrep -f "containerd --config $STATE/containerd.toml" | grep -v "$(cat "$RUN/containerd.tini.pid")" | head -1 > "$RUN/containerd.pid"
}

# The sandbox ("pause") image: busybox sleeping, as a docker-archive imported into the
# CRI namespace.
pause_image() {
  ctr --address "$SOCK" -n k8s.io images ls -q | grep -qx "$PAUSE" && return
  local d
  d=$(mktemp -d)
  mkdir -p "$d/root/bin"
  cp /bin/busybox "$d/root/bin/busybox"
  tar -C "$d/root" -cf "$d/layer.tar" .
  local diff cfg
  diff=$(sha256sum "$d/layer.tar" | cut -d' ' -f1)
  printf '{"architecture":"amd64","os":"linux","config":{"Entrypoint":["/bin/busybox","sleep","2147483647"]},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' \
    "$diff" > "$d/config.json"
  cfg=$(sha256sum "$d/config.json" | cut -d' ' -f1)
  mv "$d/config.json" "$d/$cfg.json"
  printf '[{"Config":"%s.json","RepoTags":["%s"],"Layers":["layer.tar"]}]' "$cfg" "$PAUSE" > "$d/manifest.json"
  tar -C "$d" -cf "$d/pause.tar" manifest.json "$cfg.json" layer.tar
  ctr --address "$SOCK" -n k8s.io images import "$d/pause.tar" >/dev/null
  rm -rf "$d"
  log "imported $PAUSE"
}

kubelet_up() {
  [[ -x "$BIN/kubelet" ]] || die "no $BIN/kubelet: run hack/cluster.sh build"
  mkdir -p "$STATE/kubelet"
  local want
  want=$(cat <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupsPerQOS: false
enforceNodeAllocatable: []
failSwapOn: false
containerRuntimeEndpoint: unix://$SOCK
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: "$PKI/ca.crt"}
authorization: {mode: Webhook}
address: $NODE_IP
readOnlyPort: 0
resolvConf: /etc/resolv.conf
# This machine's disk reads as 85 % full to the kubelet: at the default thresholds it
# deletes every unused image (the pause image too) and evicts Pods. A test node keeps its
# images and evicts nothing for disk.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%"}
YAML
)
  if running "$RUN/kubelet.pid"; then
    [[ "$(cat "$STATE/kubelet.yaml" 2>/dev/null)" == "$want" ]] && return
    log "kubelet configuration changed: restarting it"
    stop "$RUN/kubelet.pid"
  fi
  printf '%s\n' "$want" > "$STATE/kubelet.yaml"
  # A Node left from an earlier run still says Ready: let this kubelet register anew, so
  # that Ready below is its own.
  kubectl delete node "$NODE" --ignore-not-found >/dev/null 2>&1 || true
  log "starting kubelet ($NODE at $NODE_IP)"
  setsid "$BIN/kubelet" --config "$STATE/kubelet.yaml" --kubeconfig "$STATE/kubelet.kubeconfig" \
    --root-dir "$STATE/kubelet" --cert-dir "$STATE/kubelet-pki" \
    --hostname-override "$NODE" --node-ip "$NODE_IP" \
    </dev/null >>"$STATE/kubelet.log" 2>&1 &
  echo $! > "$RUN/kubelet.pid"
}

up() {
  command -v containerd >/dev/null || die "containerd is not installed: run hack/deps.sh"
  [[ -f "$PKI/ca.key" ]] || die "no control plane: run hack/cluster.sh up"
  local t0=$SECONDS
  net_up
  kubelet_pki
  containerd_up
  pause_image
  kubelet_up
  for _ in $(seq 1 120); do
    if kubectl get node "$NODE" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null | grep -qx True; then
      log "node $NODE Ready in $((SECONDS - t0)) s"
      return 0
    fi
    sleep 1
  done
  tail -n 20 "$STATE/kubelet.log" >&2
  die "node $NODE not Ready after 120 s; see $STATE/kubelet.log"
}

stop() { # pidfile
  if running "$1"; then kill "$(cat "$1")" 2>/dev/null || true; fi
  rm -f "$1"
}

down() {
  stop "$RUN/kubelet.pid"
  # Pods' containers go with containerd's shims: ask the runtime to stop them first.
  if [[ -S "$SOCK" ]]; then
    for c in $(ctr --address "$SOCK" -n k8s.io tasks ls -q 2>/dev/null); do
      ctr --address "$SOCK" -n k8s.io tasks kill -s SIGKILL "$c" >/dev/null 2>&1 || true
    done
  fi
  stop "$RUN/containerd.pid"
  stop "$RUN/containerd.tini.pid"
  # Shims outlive containerd by design (live restore); this node is going away.
  pkill -f -- "containerd-shim-runc-v2 .*-address $SOCK" 2>/dev/null || true
  # Pod network namespaces the CNI plugins made.
  for n in $(ip netns list 2>/dev/null | awk '/^cni-/ {print $1}'); do ip netns del "$n" 2>/dev/null || true; done
  # kubelet makes its root directory a mount (Pod volumes are mounts below it), and
  # containerd mounts each sandbox's /dev/shm under its state: deepest first.
  awk -v a="$STATE/kubelet" -v b="$RUN/" '$2 == a || index($2, a "/") == 1 || index($2, b) == 1 {print $2}' /proc/mounts |
    sort -r | while read -r m; do umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true; done
  rm -rf "$RUN"
  kubectl delete node "$NODE" --ignore-not-found >/dev/null 2>&1 || true
  service_net_down
  ip link del vmlet-cni0 2>/dev/null || true
  ip link del vmlet-node0 2>/dev/null || true
  log "node $NODE down"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) if running "$RUN/kubelet.pid"; then echo "kubelet: up ($NODE)"; else echo "kubelet: down"; fi ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
