#!/bin/sh
# Checks of the ollama role: OLLAMA_HOST is set and ollama-check gives a verdict
# (no server runs in the test sandbox, so "not reachable" with exit 1 is the expected answer).
set -u
grep -q '^OLLAMA_HOST=http' /etc/environment || { echo "OLLAMA_HOST missing"; exit 1; }
out=$(OLLAMA_CHECK_TIMEOUT=2 ollama-check); rc=$?
echo "$out"
case "$rc:$out" in
  0:*reachable*|1:*"not reachable"*) echo "ollama: ok" ;;
  *) echo "ollama-check gave no verdict (exit $rc)"; exit 1 ;;
esac
