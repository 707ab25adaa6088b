#!/usr/bin/env bash
# Runs `kiln bench sandbox` against a throwaway server (own data dir, port 7787, warm pool 2,
# org quotas raised so that N sandboxes fit),
# then stops it and removes everything it made. Usage: scripts/bench.sh KILN_BIN [N]
set -euo pipefail
kiln=${1:?usage: scripts/bench.sh path/to/kiln [N]}
n=${2:-200}
data=$(mktemp -d /var/tmp/kiln-bench.XXXXXX)
images=${KILN_TEST_IMAGES:-${KILN_IMAGES_DIR:-/var/lib/kiln/images}}
"$kiln" up --listen 127.0.0.1:7787 --ssh-listen 127.0.0.1:7788 --data-dir "$data" --images-dir "$images" --warm-pool 2 \
  --disk-pool 64G --org-max-sandboxes 1000 --org-max-cpus 1000 --org-max-memory 1T \
  >"$data/server.log" 2>&1 &
pid=$!
cleanup() {
  kill -TERM "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  # A clean stop with no sandboxes left unmounts the disk pool; only then drop the data dir.
  if ! grep -q " $data/" /proc/self/mountinfo; then rm -rf "$data"; fi
}
trap cleanup EXIT
for _ in $(seq 1 600); do
  if curl -fsS http://127.0.0.1:7787/v1/health >/dev/null 2>&1; then break; fi
  kill -0 "$pid" 2>/dev/null || { cat "$data/server.log"; exit 1; }
  sleep 0.2
done
KILN_URL=http://127.0.0.1:7787 KILN_DATA_DIR="$data" "$kiln" bench sandbox --n "$n" "${@:3}"
