"""Start the real launchers (torchrun, deepspeed) or plain rank processes from pytest, with a wall-time bound."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def tp_engines_alone() -> Iterator[None]:
    """Hold a machine-wide lock while a launch builds tensor-parallel CPU engines (across pytest-xdist workers).

    vLLM 0.32's CPU worker names its shared-memory segments after the distributed init method
    (`VLLM_DIST_IDENT`), which is `env://` for every `external_launcher` engine: two TP launches on one
    machine at once share segments, and one of them dies (seen when two workers ran TP launches together)."""
    with open(Path(tempfile.gettempdir()) / "rlsync-tp-engines.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _env(out: Path, **extra: str) -> dict[str, str]:
    # A user's shell, not this test process's leftovers: importing trl sets VLLM_LOGGING_LEVEL=ERROR (which would
    # silence the engine log lines `check_run` counts) and a CPU engine built here leaves VLLM_DIST_IDENT. Which
    # files ran before on this xdist worker decides whether they are set, so they are always dropped.
    env = {k: v for k, v in os.environ.items() if k not in ("VLLM_LOGGING_LEVEL", "VLLM_DIST_IDENT")}
    env.update({
        "RLSYNC_TEST_OUT": str(out), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "DS_ACCELERATOR": "cpu",
    })
    env.update(extra)
    return env


def _run(cmd: list[str], out: Path, timeout_s: float) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env=_env(out), capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-6000:]
        raise AssertionError(f"{' '.join(cmd[:3])} ... exited {proc.returncode}:\n{tail}")
    return proc


def torchrun(script: str, args: list[str], out: Path, timeout_s: float) -> list[list[dict]]:
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(HERE / script), *args]
    _run(cmd, out, timeout_s)
    return results(out)


def deepspeed(script: str, args: list[str], out: Path, timeout_s: float) -> list[list[dict]]:
    port = free_port()
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(port), str(HERE / script), *args]
    _run(cmd, out, timeout_s)
    assert_no_shm_left(port)
    return results(out)


def assert_no_shm_left(port: int) -> None:
    """The launch on `port` left no DeepSpeed CPU all-reduce buffer in /dev/shm (66 MiB of RAM each, until reboot;
    `rlsync.trainer.init_deepspeed` removes their names). A launch that never made them passes too."""
    shm = Path("/dev/shm")
    if not shm.is_dir():
        return
    from rlsync.trainer.dist import DEEPSPEED_SHM_PREFIX

    left = sorted(p.name for p in shm.glob(f"{DEEPSPEED_SHM_PREFIX}_*_{port}_*"))
    assert not left, f"the deepspeed launch on port {port} left {left} in /dev/shm"


def results(out: Path) -> list[list[dict]]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def plain_ranks(script: str, args: list[str], out: Path) -> list[subprocess.Popen]:
    """Two processes with RANK/WORLD_SIZE/MASTER_* set (torch.distributed env:// init), no launcher."""
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = _env(out, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port)
        log = open(out / f"log{rank}", "w")
        procs.append(subprocess.Popen([sys.executable, str(HERE / script), *args], cwd=REPO, env=env,
                                      stdout=log, stderr=subprocess.STDOUT))
    return procs
