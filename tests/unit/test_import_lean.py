"""`import rlsync` and every subpackage stay lean: no vLLM, DeepSpeed, trl or transformers, no tracker or plotting
library, no CUDA initialisation.

Each import runs in a fresh interpreter, so one subpackage's heavy import cannot hide behind
another's. `rlsync.integrations` (the trl callback) may import transformers, never vLLM.
"""

import json
import subprocess
import sys

import pytest

SUBPACKAGES = [
    "rlsync",
    "rlsync.adapters",
    "rlsync.cli",
    "rlsync.config",
    "rlsync.engine",
    "rlsync.integrations",
    "rlsync.quant",
    "rlsync.reload",
    "rlsync.rl",
    "rlsync.source",
    "rlsync.trainer",
]
HEAVY = ("vllm", "deepspeed", "trl", "transformers", "wandb", "trackio", "tensorboard", "matplotlib")
ALLOWED = {"rlsync.integrations": {"transformers"}}

PROBE = """
import importlib, json, sys
importlib.import_module(sys.argv[1])
torch = sys.modules.get("torch")
print(json.dumps({
    "heavy": sorted(m for m in sys.argv[2:] if m in sys.modules),
    "cuda_initialized": torch is not None and torch.cuda.is_initialized(),
}))
"""


@pytest.mark.parametrize("name", SUBPACKAGES)
def test_import_does_not_load_heavy_dependencies(name):
    out = subprocess.run([sys.executable, "-c", PROBE, name, *HEAVY], capture_output=True, text=True)
    assert out.returncode == 0, f"`import {name}` failed:\n{out.stderr}"
    result = json.loads(out.stdout.strip().splitlines()[-1])
    forbidden = sorted(set(result["heavy"]) - ALLOWED.get(name, set()))
    assert forbidden == [], f"`import {name}` imported {forbidden}"
    assert not result["cuda_initialized"], f"`import {name}` initialised CUDA"
