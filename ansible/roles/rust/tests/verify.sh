#!/bin/sh
# Checks of the rust role, offline: cargo new && cargo run, and an LSP initialize handshake
# with rust-analyzer when the template has it (the manifest says why when it does not).
set -eu
d=$(mktemp -d)
cd "$d"
export CARGO_HOME="$d/cargo-home"
cargo new -q --vcs none hello
cd hello
test "$(cargo run -q --offline)" = "Hello, world!"
if command -v rust-analyzer >/dev/null && rust-analyzer --version >/dev/null 2>&1; then
  kiln-lsp-check rust-analyzer
else
  echo "rust-analyzer: unavailable ($(grep rust-analyzer /etc/kiln/tools.d/rust.tsv | cut -f2))"
fi
echo "rust: ok ($(rustc --version))"
