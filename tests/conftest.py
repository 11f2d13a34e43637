"""Shared fixtures and the test tiers. vLLM runs in-process (colocated), with a small KV cache.

Tiers follow the directories: every test under tests/integration is marked
`integration`, every test under tests/distributed `distributed` (a hook does it:
a `pytestmark` in a conftest marks nothing), so `-m "not integration and not
distributed"` selects exactly tests/unit. The unit tier must not need vLLM: a
unit test (or unit test module) during which `vllm` gets imported fails, and so
does a unit-only session that imported `vllm` anywhere (a conftest, a plugin).

Limitation: the check watches the first import of `vllm` in the session. In a
run that also executes integration tests, those import it first, so a unit test
that needs vLLM is caught only by a unit-only run (`pytest tests/unit`).

Helpers shared between test files live in support modules
(tests/integration/support.py, tests/unit/support.py, tests/distributed/common.py),
never in a conftest or a test file.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Trackers (`run.report_to`) stay on this machine: wandb offline, trackio's local store in a temporary directory
# (trackio reads TRACKIO_DIR when it is imported), never the network or the home directory.
os.environ["WANDB_MODE"] = "offline"
os.environ["TRACKIO_DIR"] = tempfile.mkdtemp(prefix="rlsync-tests-trackio-")
atexit.register(shutil.rmtree, os.environ["TRACKIO_DIR"], ignore_errors=True)

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

TESTS = Path(__file__).parent
MARKED_TIERS = ("integration", "distributed")  # directory name == marker name
HEAVY = "vllm"
_unit_only = pytest.StashKey[bool]()
_heavy_importer = pytest.StashKey[str]()
_imported_before = pytest.StashKey[bool]()


def tier_of(path: Path) -> str | None:
    """The tests/ subdirectory `path` lies in ("unit", "integration", ...), or None."""
    try:
        parts = Path(path).relative_to(TESTS).parts
    except ValueError:
        return None
    return parts[0] if len(parts) > 1 else None


@pytest.hookimpl(tryfirst=True)  # before pytest's own hook deselects by `-m`
def pytest_collection_modifyitems(config, items):
    for item in items:
        tier = tier_of(item.path)
        if tier in MARKED_TIERS:
            item.add_marker(tier)


def pytest_collection_finish(session):
    session.config.stash[_unit_only] = bool(session.items) and all(tier_of(i.path) == "unit" for i in session.items)


def _fail_if_heavy_import(node, report, imported_before: bool) -> None:
    """Turn `report` into a failure if `vllm` got imported while collecting or running the unit `node`."""
    if imported_before or HEAVY not in sys.modules or tier_of(node.path) != "unit":
        return
    report.outcome = "failed"
    report.longrepr = f"`{HEAVY}` was imported by {node.nodeid}: the unit tier must run without vLLM (move the test to tests/integration)"
    node.config.stash[_heavy_importer] = node.nodeid


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    imported_before = HEAVY in sys.modules
    report = yield
    _fail_if_heavy_import(collector, report, imported_before)
    return report


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    item.stash[_imported_before] = HEAVY in sys.modules


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if _heavy_importer not in item.config.stash:  # flag the first phase (setup, call or teardown) only
        _fail_if_heavy_import(item, report, item.stash[_imported_before])
    return report


def pytest_sessionfinish(session):
    """A unit-only session that imported `vllm` outside any unit test (conftest, plugin) fails too."""
    unit_only = session.config.stash.get(_unit_only, False)
    if unit_only and HEAVY in sys.modules and _heavy_importer not in session.config.stash:
        session.config.get_terminal_writer().line(
            f"\nERROR: `{HEAVY}` was imported in a unit-only session: the unit tier must run without vLLM", red=True
        )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def tiny_path():
    """The default tiny Qwen2 checkpoint (built once, cached on disk)."""
    from rlsync.default_model import tiny_model_path

    return tiny_model_path()


@pytest.fixture
def trainer_model(tiny_path):
    """A fresh fp32 trainer model loaded from the tiny checkpoint."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32)
