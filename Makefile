# vmlet: the two commands are `make demo` and `make test`; both set up a fresh machine.
SHELL := /bin/bash
export KUBECONFIG ?= $(CURDIR)/.cache/cluster/kubeconfig
export PATH := $(CURDIR)/.cache/bin:$(PATH)
CARGO ?= cargo

.PHONY: all deps build image cluster-up cluster-down libvirt-up libvirt-down hosts-up hosts-down node-up node-down crds chart-readme lint test test-unit demo demo-down bench clean

all: build

deps:
	hack/deps.sh

build:
	$(CARGO) build --bins

cluster-up: deps
	hack/cluster.sh up

cluster-down:
	hack/cluster.sh down

libvirt-up: deps
	hack/libvirt.sh up

libvirt-down:
	hack/libvirt.sh down

## hosts-up: two more libvirt hosts in network namespaces, for live migration tests
hosts-up: deps
	hack/hosts.sh up

hosts-down:
	hack/hosts.sh down

## node-up: a real worker node (kubelet, containerd, runc, CNI) on this machine
node-up: cluster-up
	hack/node.sh up

node-down:
	hack/node.sh down

## image: the vmlet image, built without a Docker engine or a registry (hack/image.sh:
## Debian packages -> root filesystem, release binaries, umoci, skopeo), imported into the
## local node's containerd as vmlet:dev when that node runs (make node-up)
image: deps
	hack/image.sh build dev
	@if hack/node.sh status | grep -q '^kubelet: up'; then hack/image.sh import dev; \
	 else echo "[image] the local node is not running: hack/image.sh import dev after make node-up"; fi

## crds: regenerate crds/ from the code
crds:
	VMLET_UPDATE_CRDS=1 $(CARGO) test --test crds
	rm -f charts/vmlet/crds/*.yaml && cp crds/*.yaml charts/vmlet/crds/

## chart-readme: regenerate charts/vmlet/README.md from the comments in values.yaml
chart-readme:
	VMLET_UPDATE_GOLDEN=1 $(CARGO) test --test chart_readme

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings
	$(CARGO) fmt --check --manifest-path placeholder/Cargo.toml
	$(CARGO) clippy --manifest-path placeholder/Cargo.toml --target-dir target/placeholder -- -D warnings

## test: the whole suite, against the real local control plane and libvirt. A running
## demo is stopped first: its controller would be a second scheduler beside the tests'.
test: cluster-up libvirt-up hosts-up node-up image lint
	@if [[ -f .cache/demo/controller.pid ]]; then echo "[test] stopping the demo (make demo starts it again)"; hack/demo.sh down; fi
	$(CARGO) test --lib --bins --tests -- --test-threads=4

## test-unit: the tests that need no cluster, no libvirtd and no root: unit tables, golden
## files, generated CRDs, the renderer's properties, the fencing rule, the Dockerfile, the
## chart's README
test-unit:
	$(CARGO) test --lib --bins --test golden --test render_props --test crds --test dockerfile --test fencing_rule --test chart_readme

## demo: control plane + agent on local libvirt, boots the tiny guest and shows it Running
## (hack/demo.sh installs and starts what it needs itself, so that it can name a failed step)
demo:
	hack/demo.sh

demo-down:
	hack/demo.sh down

## bench: benchmarks; writes docs/benchmarks.md
bench: cluster-up libvirt-up
	hack/bench.sh

clean:
	hack/cluster.sh down || true
	rm -rf .cache/cluster target
