"""The layering in docs/architecture.md holds: import-linter's contracts (pyproject.toml) are kept.

Runs `lint-imports` in a subprocess from the repository root, so an upward
import, an import cycle between sibling modules, or a vLLM / trl import
outside `rlsync.adapters` fails the suite with import-linter's report.
"""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_import_contracts_are_kept():
    lint = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(lint), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout and "4 kept" in proc.stdout, proc.stdout[-3000:]
