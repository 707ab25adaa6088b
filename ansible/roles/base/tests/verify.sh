#!/bin/sh
# Checks of the base role; run inside a sandbox by `kiln template test` (offline).
set -eu
id user
test -d /workspace && test "$(stat -c %U /workspace)" = user
grep -q '^LANG=C.UTF-8' /etc/default/locale
for t in curl jq less unzip ps; do command -v "$t" >/dev/null || { echo "missing $t"; exit 1; }; done
test -s /etc/ssl/certs/ca-certificates.crt
echo '{"ok":true}' | jq -e .ok >/dev/null
echo "base: ok"
