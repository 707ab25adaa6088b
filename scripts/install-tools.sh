#!/usr/bin/env bash
# Installs the Python tools the test suite drives (schemathesis, openapi-spec-validator) into
# their own virtualenv, idempotently, from scripts/tools-requirements.txt (versions and sha256
# of every package pinned; pip refuses anything else).
# Usage: scripts/install-tools.sh   (KILN_TOOLS_DIR overrides /opt/kiln-tools)
set -euo pipefail
cd "$(dirname "$0")"
dir="${KILN_TOOLS_DIR:-/opt/kiln-tools}"
req="$PWD/tools-requirements.txt"
want=$(sha256sum "$req" | cut -d' ' -f1)
if [ -x "$dir/bin/schemathesis" ] && [ "$(cat "$dir/.requirements-sha256" 2>/dev/null)" = "$want" ]; then
  echo "install-tools: $dir is current"
  exit 0
fi
command -v python3 >/dev/null || { echo "install-tools: python3 is missing (hint: apt-get install python3 python3-venv)" >&2; exit 1; }
rm -rf "$dir"
python3 -m venv "$dir" || { echo "install-tools: cannot create a virtualenv (hint: apt-get install python3-venv)" >&2; exit 1; }
"$dir/bin/pip" install -q --disable-pip-version-check --require-hashes --no-deps -r "$req"
echo "$want" > "$dir/.requirements-sha256"
echo "install-tools: installed $("$dir/bin/schemathesis" --version) into $dir"
