# vramslice — the two commands a newcomer needs:
#   make demo   start the local demo cluster (real kube-apiserver, kube-scheduler, hollow GPU nodes)
#   make test   run the whole test suite (what CI runs through .ci/run)
SHELL := /bin/bash
.DEFAULT_GOAL := help

.PHONY: help demo test test-rust lint e2e bench crds manifests

help:
	@echo "make demo   - build everything and start the local demo cluster (Ctrl-C stops it)"
	@echo "make test   - run the whole test suite (Rust, Python, chart, Dockerfiles, glibc floor, e2e)"
	@echo "make e2e    - only the real-cluster scenarios"
	@echo "make bench  - the scheduling benchmark on the e2e cluster (1,000 pods, 50 hollow nodes)"

demo:
	./scripts/e2e-demo.sh

test:
	./scripts/test-all.sh

e2e:
	./scripts/e2e-run.sh

bench:
	./scripts/e2e-bench.sh

test-rust:
	cargo test --workspace

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

crds:
	cargo run -q -p vramslice-api --bin crdgen -- --write

manifests:
	./scripts/render-manifests.sh
