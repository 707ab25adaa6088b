#!/usr/bin/env bash
# The server suite a second time, on PostgreSQL (each test in its own schema), with the very
# test binary `cargo test --workspace` just built: `cargo test -p kiln-server` alone would
# resolve features for fewer packages and rebuild half the workspace (10+ minutes cold).
# Usage: scripts/test-postgres.sh KILND IMAGES KILN MODEL_DIR DATASET_DIR
set -euo pipefail
cd "$(dirname "$0")/.."
kilnd=$1 images=$2 kiln=$3 models=$4 datasets=$5
bin=$(cargo test --release --workspace --no-run --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if (m.get("reason") == "compiler-artifact" and m.get("executable")
            and m["target"]["name"] == "it" and "/crates/kiln-server#" in m["package_id"]):
        print(m["executable"])
        break
')
if [ -z "$bin" ]; then
  echo "test-postgres: the kiln-server test binary was not found (hint: run cargo test --workspace first)" >&2
  exit 1
fi
cd crates/kiln-server
KILN_TEST_STORE=postgres KILN_KILND="$kilnd" KILN_TEST_IMAGES="$images" KILN_BIN="$kiln" \
  KILN_MODEL_DIR="$models" KILN_DATASET_DIR="$datasets" CARGO_MANIFEST_DIR="$PWD" \
  "$bin" --test-threads="${KILN_TEST_THREADS:-2}"
