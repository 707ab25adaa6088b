#!/bin/sh
# Checks of the node role, offline: node -e, a TypeScript compile and run, pnpm, and an LSP
# initialize handshake with typescript-language-server.
set -eu
d=$(mktemp -d)
cd "$d"
test "$(node -e 'console.log(6 * 7)')" = 42
cat > hello.ts <<'TS'
function greet(name: string): string { return `hello ${name}`; }
console.log(greet("kiln"));
TS
tsc --strict hello.ts
test "$(node hello.js)" = "hello kiln"
pnpm --version
kiln-lsp-check --init "{\"tsserver\":{\"path\":\"$(npm root -g)/typescript/lib\"}}" typescript-language-server --stdio
echo "node: ok (node $(node --version), tsc $(tsc --version))"
