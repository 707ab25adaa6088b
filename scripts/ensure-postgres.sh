#!/usr/bin/env bash
# Makes sure the PostgreSQL the tests use (KILN_TEST_DATABASE_URL, default
# postgres://root@127.0.0.1:5432/test) answers: starts the local cluster if it is stopped.
# Each test creates and drops its own schema, so parallel runs never collide.
set -euo pipefail
url="${KILN_TEST_DATABASE_URL:-postgres://root@127.0.0.1:5432/test}"
if psql "$url" -qtAc 'select 1' >/dev/null 2>&1; then
  exit 0
fi
if command -v pg_lsclusters >/dev/null; then
  pg_lsclusters --no-header | while read -r ver name _port status _rest; do
    if [ "$status" != "online" ]; then
      echo "ensure-postgres: starting cluster $ver/$name" >&2
      pg_ctlcluster --skip-systemctl-redirect "$ver" "$name" start
    fi
  done
fi
for _ in $(seq 1 30); do
  psql "$url" -qtAc 'select 1' >/dev/null 2>&1 && exit 0
  sleep 1
done
echo "ensure-postgres: PostgreSQL at $url does not answer (hint: install postgresql and create role root with a database test)" >&2
exit 1
