#!/usr/bin/env bash
# A real local Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler)
# on 127.0.0.1, built from the Go module proxy.
#
#   hack/cluster.sh build        build the pinned binaries into .cache/bin (only when a pin changed)
#   hack/cluster.sh up [--fresh] start the control plane (idempotent); --fresh wipes its state
#   hack/cluster.sh down         stop the processes this script started (pid files)
#   hack/cluster.sh status       print what runs
#
# Binaries are also kept in a per-user cache keyed by the pinned versions
# ($VMLET_BIN_CACHE, default ~/.cache/vmlet/bin), so a fresh clone on the same
# machine (CI) reuses them instead of rebuilding.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN="$ROOT/.cache/bin"
STATE="$ROOT/.cache/cluster"
PKI="$STATE/pki"
LOGS="$STATE/logs"
RUN="$STATE/run"
ETCD_DATA="$STATE/etcd"
KUBECONFIG_OUT="$STATE/kubeconfig"
MODS="$ROOT/hack/cluster"

ETCD_CLIENT_PORT=${VMLET_ETCD_PORT:-23790}
ETCD_PEER_PORT=$((ETCD_CLIENT_PORT + 1))
APISERVER_PORT=${VMLET_APISERVER_PORT:-6443}
KCM_PORT=${VMLET_KCM_PORT:-10257}
SCHED_PORT=${VMLET_SCHEDULER_PORT:-10259}
SERVICE_CIDR=10.96.0.0/16

log() { printf '[cluster] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# --- build -------------------------------------------------------------------------

pins_hash() {
  cat "$MODS"/*/go.mod "$MODS"/*/go.sum "$MODS"/*/tools.go "$0" | sha256sum | cut -c1-16
}

k8s_version() {
  awk '$1=="require" && $2=="k8s.io/kubernetes" {print $3}' "$MODS/kubernetes/go.mod"
}

build() {
  local hash cache
  hash=$(pins_hash)
  cache="${VMLET_BIN_CACHE:-$HOME/.cache/vmlet/bin}/$hash"
  if [[ -f "$BIN/.pins" && "$(cat "$BIN/.pins")" == "$hash" ]]; then
    log "binaries up to date ($hash)"
    return
  fi
  if [[ ! -f "$cache/.complete" ]]; then
    command -v go >/dev/null || die "go is not installed"
    mkdir -p "$cache"
    local v major minor ldflags
    v=$(k8s_version)
    major=${v#v}; major=${major%%.*}
    minor=${v#v*.}; minor=${minor%%.*}
    # Stamp the version the way Kubernetes' own build does, so that `kubectl version`
    # and the API server's compatibility version report the real release.
    ldflags="-s -w"
    for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
      ldflags+=" -X $pkg.gitVersion=$v -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
      ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
    done
    log "building kubernetes $v (kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, kubelet)"
    (cd "$MODS/kubernetes" && for cmd in kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet; do
      CGO_ENABLED=0 go build -trimpath -ldflags "$ldflags" -o "$cache/$cmd" "k8s.io/kubernetes/cmd/$cmd"
    done)
    log "building etcd"
    (cd "$MODS/etcd" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$cache/etcd" go.etcd.io/etcd/server/v3)
    log "building helm"
    # helm's own release build stamps its default Kubernetes version (what `helm template`
    # assumes with no cluster) from its client-go module: v0.N -> 1.N. Without these flags
    # it reports v1.20 and refuses charts with a kubeVersion constraint.
    local cg hmajor hminor hv
    cg=$(awk '$1=="k8s.io/client-go" {print $2}' "$MODS/helm/go.mod")
    hmajor=${cg#v}; hmajor=$((${hmajor%%.*} + 1))
    hminor=${cg#v*.}; hminor=${hminor%%.*}
    hv=$(awk '$1=="require" && $2=="helm.sh/helm/v3" {print $3}' "$MODS/helm/go.mod")
    ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$hv"
    for pkg in helm.sh/helm/v3/pkg/chartutil helm.sh/helm/v3/pkg/lint/rules; do
      ldflags+=" -X $pkg.k8sVersionMajor=$hmajor -X $pkg.k8sVersionMinor=$hminor"
    done
    (cd "$MODS/helm" && CGO_ENABLED=0 go build -trimpath -ldflags "$ldflags" -o "$cache/helm" helm.sh/helm/v3/cmd/helm)
    touch "$cache/.complete"
  fi
  mkdir -p "$BIN"
  for b in etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet helm; do
    cp -f "$cache/$b" "$BIN/$b"
  done
  echo "$hash" > "$BIN/.pins"
  log "binaries in $BIN"
}

# --- certificates --------------------------------------------------------------------

# A client or serving certificate signed by the cluster CA, in $PKI (run from there).
sign() { # name subject extfile
  openssl req -newkey rsa:2048 -nodes -keyout "$1.key" -out "$1.csr" -subj "$2" 2>/dev/null
  openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
    -extfile "$3" -out "$1.crt" 2>/dev/null
  rm -f "$1.csr"
  chmod 600 "$1.key"
}

gen_pki() {
  [[ -f "$PKI/.complete" ]] && return
  command -v openssl >/dev/null || die "openssl is not installed"
  mkdir -p "$PKI"
  (
    cd "$PKI"
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -keyout ca.key -out ca.crt \
      -subj "/CN=vmlet-local-ca" 2>/dev/null
    cat > serving.ext <<EOF
basicConstraints=CA:FALSE
keyUsage=digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth,clientAuth
subjectAltName=IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local
EOF
    cat > client.ext <<EOF
basicConstraints=CA:FALSE
keyUsage=digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth
EOF
    sign serving "/CN=127.0.0.1" serving.ext
    sign admin "/O=system:masters/CN=vmlet-admin" client.ext
    sign kcm "/CN=system:kube-controller-manager" client.ext
    sign apiserver-etcd-client "/CN=kube-apiserver-etcd-client" client.ext
    # The service-account issuer's key pair: real, signed ServiceAccount tokens.
    openssl genrsa -out sa.key 2048 2>/dev/null
    openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
    chmod 600 ./*.key
  )
  touch "$PKI/.complete"
}

# The scheduler's client certificate, also for a PKI made before the scheduler ran here.
scheduler_pki() {
  [[ -f "$PKI/scheduler.crt" ]] && return
  (cd "$PKI" && sign scheduler "/CN=system:kube-scheduler" client.ext)
}

# The front proxy: the API server calls aggregated API servers (vmlet's
# subresources.vmlet.dev) with this client certificate, from a CA of its own, and the
# user in X-Remote-* headers. Also for a PKI made before the aggregated API existed.
front_proxy_pki() {
  [[ -f "$PKI/front-proxy-client.crt" ]] && return
  (
    cd "$PKI"
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -keyout front-proxy-ca.key \
      -out front-proxy-ca.crt -subj "/CN=vmlet-front-proxy-ca" 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -keyout front-proxy-client.key \
      -out front-proxy-client.csr -subj "/CN=front-proxy-client" 2>/dev/null
    openssl x509 -req -in front-proxy-client.csr -CA front-proxy-ca.crt -CAkey front-proxy-ca.key \
      -CAcreateserial -days 3650 -extfile client.ext -out front-proxy-client.crt 2>/dev/null
    rm -f front-proxy-client.csr
    chmod 600 ./*.key
  )
}

kubeconfig() { # out user cert key
  cat > "$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: vmlet-local
  cluster:
    server: https://127.0.0.1:$APISERVER_PORT
    certificate-authority: $PKI/ca.crt
users:
- name: $2
  user:
    client-certificate: $PKI/$3.crt
    client-key: $PKI/$3.key
contexts:
- name: vmlet-local
  context: {cluster: vmlet-local, user: $2}
current-context: vmlet-local
EOF
  chmod 600 "$1"
}

# --- processes -----------------------------------------------------------------------

alive() { [[ -f "$RUN/$1.pid" ]] && kill -0 "$(cat "$RUN/$1.pid")" 2>/dev/null; }

start() { # name args...
  local name=$1; shift
  if alive "$name"; then return; fi
  log "starting $name"
  setsid "$BIN/$name" "$@" >>"$LOGS/$name.log" 2>&1 < /dev/null &
  echo $! > "$RUN/$name.pid"
}

# For components whose /healthz lets any client through (it is always allowed).
wait_healthz() { # process port
  local i
  for ((i = 0; i < 150; i++)); do
    curl -sfk --max-time 2 "https://127.0.0.1:$2/healthz" >/dev/null 2>&1 && return 0
    alive "$1" || die "$1 exited; log: $LOGS/$1.log"
    sleep 0.2
  done
}

wait_url() { # process url client-cert seconds
  local i
  for ((i = 0; i < $4 * 5; i++)); do
    if curl -sf --max-time 2 --cacert "$PKI/ca.crt" --cert "$PKI/$3.crt" --key "$PKI/$3.key" "$2" >/dev/null 2>&1; then
      return 0
    fi
    alive "$1" || { tail -n 30 "$LOGS/$1.log" >&2; die "$1 exited; log: $LOGS/$1.log"; }
    sleep 0.2
  done
  tail -n 30 "$LOGS/$1.log" >&2
  die "$1 not ready after $4 s ($2)"
}

healthy() {
  alive etcd && alive kube-apiserver && alive kube-controller-manager && alive kube-scheduler &&
    curl -sf --max-time 2 --cacert "$PKI/ca.crt" --cert "$PKI/admin.crt" --key "$PKI/admin.key" \
      "https://127.0.0.1:$APISERVER_PORT/readyz" >/dev/null 2>&1
}

up() {
  local fresh=0
  [[ "${1:-}" == "--fresh" ]] && fresh=1
  if ((fresh)); then
    down
    rm -rf "$STATE"
  elif healthy && grep -q requestheader "/proc/$(cat "$RUN/kube-apiserver.pid")/cmdline" 2>/dev/null; then
    log "control plane already up; kubeconfig: $KUBECONFIG_OUT"
    return
  elif healthy; then
    log "restarting the control plane with the front proxy (aggregated APIs)"
    down
  fi
  [[ -x "$BIN/kube-apiserver" ]] || build
  mkdir -p "$LOGS" "$RUN" "$ETCD_DATA"
  chmod 700 "$ETCD_DATA"
  gen_pki
  front_proxy_pki

  start etcd --name vmlet-local --data-dir "$ETCD_DATA" \
    --listen-client-urls "https://127.0.0.1:$ETCD_CLIENT_PORT" \
    --advertise-client-urls "https://127.0.0.1:$ETCD_CLIENT_PORT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster "vmlet-local=http://127.0.0.1:$ETCD_PEER_PORT" \
    --listen-metrics-urls "http://127.0.0.1:$((ETCD_CLIENT_PORT + 2))" \
    --cert-file "$PKI/serving.crt" --key-file "$PKI/serving.key" \
    --client-cert-auth --trusted-ca-file "$PKI/ca.crt" \
    --quota-backend-bytes 4294967296 --unsafe-no-fsync
  wait_url etcd "https://127.0.0.1:$ETCD_CLIENT_PORT/health" apiserver-etcd-client 30

  start kube-apiserver \
    --advertise-address 127.0.0.1 --bind-address 127.0.0.1 --secure-port "$APISERVER_PORT" \
    --endpoint-reconciler-type none \
    --etcd-servers "https://127.0.0.1:$ETCD_CLIENT_PORT" \
    --etcd-cafile "$PKI/ca.crt" --etcd-certfile "$PKI/apiserver-etcd-client.crt" \
    --etcd-keyfile "$PKI/apiserver-etcd-client.key" \
    --tls-cert-file "$PKI/serving.crt" --tls-private-key-file "$PKI/serving.key" \
    --client-ca-file "$PKI/ca.crt" \
    --authorization-mode Node,RBAC \
    --kubelet-preferred-address-types InternalIP \
    --kubelet-client-certificate "$PKI/admin.crt" --kubelet-client-key "$PKI/admin.key" \
    --service-account-issuer "https://kubernetes.default.svc.cluster.local" \
    --service-account-key-file "$PKI/sa.pub" \
    --service-account-signing-key-file "$PKI/sa.key" \
    --api-audiences "https://kubernetes.default.svc.cluster.local" \
    --service-cluster-ip-range "$SERVICE_CIDR" \
    --allow-privileged=true \
    --requestheader-client-ca-file "$PKI/front-proxy-ca.crt" \
    --requestheader-allowed-names front-proxy-client \
    --requestheader-username-headers X-Remote-User \
    --requestheader-group-headers X-Remote-Group \
    --requestheader-extra-headers-prefix X-Remote-Extra- \
    --proxy-client-cert-file "$PKI/front-proxy-client.crt" \
    --proxy-client-key-file "$PKI/front-proxy-client.key" \
    --enable-aggregator-routing=true \
    --profiling="${VMLET_APISERVER_PROFILING:-false}"
  wait_url kube-apiserver "https://127.0.0.1:$APISERVER_PORT/readyz" admin 90

  kubeconfig "$KUBECONFIG_OUT" vmlet-admin admin
  kubeconfig "$STATE/kcm.kubeconfig" kcm kcm
  start kube-controller-manager \
    --kubeconfig "$STATE/kcm.kubeconfig" \
    --authentication-kubeconfig "$STATE/kcm.kubeconfig" \
    --authorization-kubeconfig "$STATE/kcm.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port "$KCM_PORT" \
    --cert-dir "$STATE/kcm-certs" \
    --service-account-private-key-file "$PKI/sa.key" \
    --root-ca-file "$PKI/ca.crt" \
    --use-service-account-credentials \
    --service-cluster-ip-range "$SERVICE_CIDR" \
    --leader-elect=false \
    --profiling=false
  # Pods of the real node (hack/node.sh: the chart's controller and agent) need a
  # scheduler; DaemonSet Pods too.
  scheduler_pki
  kubeconfig "$STATE/scheduler.kubeconfig" scheduler scheduler
  start kube-scheduler \
    --kubeconfig "$STATE/scheduler.kubeconfig" \
    --authentication-kubeconfig "$STATE/scheduler.kubeconfig" \
    --authorization-kubeconfig "$STATE/scheduler.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port "$SCHED_PORT" \
    --leader-elect=false \
    --profiling=false
  wait_healthz kube-controller-manager "$KCM_PORT"
  wait_healthz kube-scheduler "$SCHED_PORT"
  # The default namespace's ServiceAccount shows the token controllers are working.
  local i
  for ((i = 0; i < 150; i++)); do
    "$BIN/kubectl" --kubeconfig "$KUBECONFIG_OUT" get serviceaccount default -n default >/dev/null 2>&1 && break
    sleep 0.2
  done
  log "control plane up; kubeconfig: $KUBECONFIG_OUT"
}

stop_one() {
  local name=$1 pid i
  [[ -f "$RUN/$name.pid" ]] || return 0
  pid=$(cat "$RUN/$name.pid")
  if kill -0 "$pid" 2>/dev/null; then
    log "stopping $name ($pid)"
    kill "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$RUN/$name.pid"
}

down() {
  stop_one kube-scheduler
  stop_one kube-controller-manager
  stop_one kube-apiserver
  stop_one etcd
}

status() {
  local n
  for n in etcd kube-apiserver kube-controller-manager kube-scheduler; do
    if alive "$n"; then echo "$n running (pid $(cat "$RUN/$n.pid"))"; else echo "$n stopped"; fi
  done
  healthy && echo "readyz ok" || echo "readyz failing"
}

case "${1:-}" in
  build) build ;;
  up) shift; up "$@" ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 build | up [--fresh] | down | status" >&2; exit 2 ;;
esac
