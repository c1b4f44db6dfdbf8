# vramslice — the two commands a newcomer needs:
#   make demo   start the local demo cluster (real kube-apiserver, kube-scheduler, hollow GPU nodes)
#   make test   run the whole test suite (what CI runs through .ci/run)
SHELL := /bin/bash
.DEFAULT_GOAL := help

.PHONY: help demo test test-rust lint e2e bench crds manifests

help:
	@echo "make demo   - build everything and start the local demo cluster (Ctrl-C stops it)"
	@echo "make test   - run the whole test suite (Rust, Python, chart, e2e)"

test:
	./scripts/test-all.sh

test-rust:
	cargo test --workspace --all-targets

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

crds:
	cargo run -q -p vramslice-api --bin crdgen -- --write
