"""`import rlsync` (and its light subpackages) must not pull in vLLM, DeepSpeed or trl."""

import subprocess
import sys


def test_import_does_not_load_heavy_dependencies():
    code = (
        "import sys, rlsync, rlsync.engine, rlsync.source, rlsync.config, rlsync.cli, rlsync.quant\n"
        "heavy = sorted(m for m in ('vllm', 'deepspeed', 'trl') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"imported at `import rlsync`: {out.stdout.strip()}"
