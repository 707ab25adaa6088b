#!/usr/bin/env bash
# Installs the third-party MCP servers the agent tests drive (today the reference filesystem
# server, @modelcontextprotocol/server-filesystem) with `npm ci` from scripts/mcp: exact
# versions and the registry's sha512 integrity of every package are pinned in
# package-lock.json, and npm refuses anything else. Idempotent (a stamp holds the lock's hash).
# Usage: scripts/install-mcp-servers.sh   (KILN_MCP_SERVERS_DIR overrides /opt/kiln-mcp)
set -euo pipefail
cd "$(dirname "$0")/mcp"
dir="${KILN_MCP_SERVERS_DIR:-/opt/kiln-mcp}"
want=$(cat package.json package-lock.json | sha256sum | cut -d' ' -f1)
if [ -f "$dir/node_modules/@modelcontextprotocol/server-filesystem/dist/index.js" ] \
   && [ "$(cat "$dir/.lock-sha256" 2>/dev/null)" = "$want" ]; then
  echo "install-mcp-servers: $dir is current"
  exit 0
fi
command -v npm >/dev/null || { echo "install-mcp-servers: npm is missing (hint: apt-get install nodejs npm)" >&2; exit 1; }
major=$(node -p 'process.versions.node.split(".")[0]')
if [ "$major" -lt 18 ]; then
  echo "install-mcp-servers: node $(node --version) is too old; the MCP servers need 18 or later" >&2
  exit 1
fi
mkdir -p "$dir"
cp package.json package-lock.json "$dir/"
# --ignore-scripts: nothing from the registry runs at install time.
npm ci --prefix "$dir" --ignore-scripts --no-audit --no-fund --loglevel=error
echo "$want" > "$dir/.lock-sha256"
echo "install-mcp-servers: installed $(node -p "require('$dir/node_modules/@modelcontextprotocol/server-filesystem/package.json').version") of @modelcontextprotocol/server-filesystem into $dir"
