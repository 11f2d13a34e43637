"""One benchmark method in one fresh process: build the engine, sync repeatedly, measure.

`benchmarks/sync.py` runs this module's `run_child` once per (model, quant,
method) in its own subprocess, so peak-RSS figures are not flattered by heap
memory an earlier method freed but the allocator kept.

The methods, all fed the same bf16 trainer tensors (a Hugging Face model
loaded from the checkpoint, every tensor cloned into anonymous memory and
perturbed so each sync writes new values). Methods that take a list of
tensors get the checkpoint's names and layout: where transformers keeps
another layout in memory (MoE experts fused into 3-D tensors), rlsync's
source converts them back once, before any timed sync:
- `rlsync`: `VLLMEngine.sync` with rlsync's reload backend;
- `rlsync-noplan`: the same with `sync_plan=False`: every sync through vLLM's
  `load_weights` (name mapping, loader dispatch), as before sync plans;
- `rlsync-record`: `rlsync` with its plan dropped before every sync, so every
  timed sync is a recording (first) sync: the first-sync cost with repeats, not
  one sample (opt-in with `--methods`, not in the default list);
- `rlsync-vllm`: `VLLMEngine.sync` with vLLM's layerwise reload as backend;
- `trl`: trl 1.16's colocated sync, mirrored exactly: one
  `model.load_weights([(name, param)])` per parameter, then
  `llm.reset_prefix_cache()`. On vLLM's CPU build this cannot work for bf16
  linears: processing moves their weights into a oneDNN handle and leaves an
  empty `weight` without a loader (the table shows the error);
- `trl-layerwise`: the same per-parameter calls between vLLM's
  `initialize_layerwise_reload` and `finalize_layerwise_reload`, the least
  change that makes per-parameter loading correct on this build, so its
  per-call cost is still measured;
- `native`: vLLM's model-runner `reload_weights(weights_iterator=...)`, fed in
  the trainer's (layer) order;
- `native-shuffled`: the same, fed in a seeded random order;
- `rebuild`: write the weights to a safetensors checkpoint, drop the engine,
  build a new one from disk.

Memory: before each sync the process's peak RSS (`VmHWM`) is reset to the
current RSS by writing `5` to `/proc/self/clear_refs`; after it, `VmHWM - VmRSS
before` is that sync's peak extra memory. Anonymous and file-backed pages both
count (a rebuild maps the checkpoint it reads). Each sync's process CPU time
(all threads, `time.process_time`) is recorded beside its wall time: on a
shared machine it moves less with other people's load.

Limitations:
1. The trainer tensors are bf16 for every method, so all move the same bytes;
   an fp32 trainer adds a cast per group (rlsync) or per tensor (trl).
2. `rebuild` does not count the first generation's warm-up of the new engine.
3. Live-byte counters exist only where the backend keeps one: rlsync's reload
   and vLLM's layerwise reload (read for native reloads in one extra, untimed
   pass that inspects vLLM's buffers after every tensor); trl's path has none.
"""

from __future__ import annotations

import gc
import json
import random
import re
import shutil
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

METHODS = ("rlsync", "rlsync-noplan", "rlsync-vllm", "trl", "trl-layerwise", "native", "native-shuffled", "rebuild",
           "rlsync-record")
OPT_IN_METHODS = ("rlsync-record",)
"""Run only when named in `--methods`."""
RESULT_PREFIX = "BENCH-RESULT "


# ------------------------------------------------------------------ memory
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field}")
    return int(match.group(1))


def reset_peak_rss() -> None:
    """Make VmHWM equal the current RSS (Linux `clear_refs` mode 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measured(fn: Callable[[], Any]) -> tuple[float, float, int, Any]:
    """(wall seconds, process CPU seconds, peak extra RSS bytes, result) of one call."""
    gc.collect()
    reset_peak_rss()
    rss_before = _status_kib("VmRSS")
    cpu_start = time.process_time()
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start
    return seconds, cpu_seconds, (_status_kib("VmHWM") - rss_before) * 1024, result


# ------------------------------------------------------------------ setup
def quant_kwargs(quant: str) -> dict[str, Any]:
    """Engine keyword arguments for a quant label (`bf16`, `fp8_per_channel`, `rlsync_fp8/<scheme>`)."""
    if quant == "bf16":
        return {"quantization": None}
    if quant == "fp8_per_channel":
        return {"quantization": "fp8_per_channel"}
    if quant.startswith("rlsync_fp8/"):
        from rlsync.quant.plugin import hf_overrides

        return {"quantization": "rlsync_fp8", "llm_kwargs": {"hf_overrides": hf_overrides(quant.split("/", 1)[1])}}
    raise ValueError(f"unknown quant {quant!r}")


def trainer_model(model_path: str, seed: int = 0) -> torch.nn.Module:
    """The checkpoint as a bf16 HF model, every tensor in fresh anonymous memory, perturbed."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.clone() + (torch.randn(p.shape, generator=gen) * 0.01).to(p.dtype)
    return model


def named_weights(model: torch.nn.Module, model_path: str) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) in the trainer's order; tied parameters once (as trl and vLLM expect).

    Where the trainer's names are not the checkpoint's (transformers 5 fuses MoE experts in memory),
    the tensors come from rlsync's source, which converts back to checkpoint names and layout."""
    weights = [(name, p.data) for name, p in model.named_parameters()]
    if {name for name, _ in weights} <= checkpoint_names(model_path):
        return weights
    from rlsync.source import ModuleSource

    return [item for group in ModuleSource(model, dtype=torch.bfloat16).groups() for item in group]


def checkpoint_names(model_path: str) -> set[str]:
    from safetensors import safe_open

    names: set[str] = set()
    for file in Path(model_path).glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            names.update(f.keys())
    return names


def build_engine(model_path: str, quant: str, backend: str, plan: bool = True):
    from rlsync.engine import VLLMEngine

    return VLLMEngine(model_path, reload_backend=backend, sync_plan=plan, **quant_kwargs(quant))


# ------------------------------------------------------------------ methods
class Bench:
    """One engine, one trainer model, one way of syncing."""

    def __init__(self, model_path: str, quant: str, method: str) -> None:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
        self.model_path, self.quant, self.method = model_path, quant, method
        self.backend = "rlsync" if method in ("rlsync", "rlsync-noplan", "rlsync-record") else "vllm"
        self.engine = build_engine(model_path, quant, self.backend, plan=method != "rlsync-noplan")
        self.trainer = trainer_model(model_path)
        self.weights = named_weights(self.trainer, model_path)
        self.num_bytes = sum(t.nbytes for _, t in self.weights)
        self.step = 0
        self.rebuild_dir: Path | None = None
        self.peak_live_bytes: int | None = None

    # each returns extra fields for the record (may be empty)
    def sync(self) -> dict[str, Any]:
        self.step += 1
        return getattr(self, "_" + self.method.replace("-", "_"))()

    def _rlsync(self) -> dict[str, Any]:
        report = self.engine.sync(self.trainer, self.step)
        self.peak_live_bytes = max(self.peak_live_bytes or 0, report.peak_load_bytes or 0)
        return {"check_s": report.nonfinite_check_seconds, "num_tensors": report.num_tensors, "planned": report.planned}

    _rlsync_vllm = _rlsync_noplan = _rlsync

    def _rlsync_record(self) -> dict[str, Any]:
        plan = getattr(self.engine.backend, "plan", None)
        if plan is None:
            raise RuntimeError("rlsync-record needs the rlsync backend with sync plans on")
        plan.clear()  # what a first sync starts from: this sync records every group again
        out = self._rlsync()
        if out["planned"] is not False:
            raise RuntimeError(f"rlsync-record: the sync did not record (planned={out['planned']})")
        return out

    def _trl(self) -> dict[str, Any]:
        from rlsync.adapters import vllm_engine

        model = self.engine.model
        for name, param in self.weights:  # trl/generation/vllm_generation.py, sync_weights, colocate
            vllm_engine.load_weights(model, [(name, param)])
        self.engine.llm.reset_prefix_cache()
        return {}

    def _trl_layerwise(self) -> dict[str, Any]:
        from rlsync.adapters import vllm_engine, vllm_load

        model = self.engine.model
        vllm_load.layerwise_begin(model)
        for name, param in self.weights:
            vllm_engine.load_weights(model, [(name, param)])
        vllm_load.layerwise_finish(model, vllm_engine.model_config(self.engine.llm))
        self.engine.llm.reset_prefix_cache()
        return {}

    def _native(self, weights: list[tuple[str, torch.Tensor]] | None = None) -> dict[str, Any]:
        from rlsync.adapters import vllm_engine

        vllm_engine.native_reload_weights(self.engine.llm, iter(weights if weights is not None else self.weights))
        return {}

    def _native_shuffled(self) -> dict[str, Any]:
        return self._native(self.shuffled())

    def shuffled(self) -> list[tuple[str, torch.Tensor]]:
        order = list(self.weights)
        random.Random(0).shuffle(order)
        return order

    def _rebuild(self) -> dict[str, Any]:
        from safetensors.torch import save_file

        start = time.perf_counter()
        out = Path(tempfile.mkdtemp(prefix="rlsync-bench-rebuild-", dir=self._scratch()))
        for f in Path(self.model_path).iterdir():
            if f.suffix != ".safetensors" and not f.name.endswith(".index.json") and f.is_file():
                shutil.copy(f, out / f.name)
        save_file({n: t.contiguous() for n, t in self.weights}, str(out / "model.safetensors"))
        save_s = time.perf_counter() - start
        old_dir, self.engine = self.rebuild_dir, None
        gc.collect()
        self.engine = build_engine(str(out), self.quant, self.backend)
        if old_dir is not None:
            shutil.rmtree(old_dir, ignore_errors=True)
        self.rebuild_dir = out
        return {"save_s": save_s}

    def _scratch(self) -> Path:
        from rlsync.default_model import cache_dir

        path = cache_dir() / "bench-scratch"  # on disk, not tmpfs: a checkpoint write is part of the cost
        path.mkdir(parents=True, exist_ok=True)
        return path

    # ---------------------------------------------------------------- extras
    def native_live_bytes(self) -> int:
        """Most bytes vLLM's layerwise reload buffered during one native reload (untimed pass)."""
        from rlsync.adapters import vllm_engine, vllm_load

        model, peak = self.engine.model, 0
        order = self.shuffled() if self.method == "native-shuffled" else self.weights

        def watched():
            nonlocal peak
            for item in order:
                yield item
                peak = max(peak, vllm_load.layerwise_live_bytes(model))

        vllm_engine.native_reload_weights(self.engine.llm, watched())
        return peak

    def verify(self) -> int:
        """Bit-exact check of every engine tensor against the trainer's weights (`rlsync.engine.verify`)."""
        from rlsync.engine.verify import verify_groups
        from rlsync.source import ModuleSource

        source = ModuleSource(self.trainer, dtype=torch.bfloat16)
        compared, _ = verify_groups(self.engine.model, self.engine.packed, source.groups(), set(self.engine.checkpoint_shapes))
        return compared

    def close(self) -> None:
        if self.rebuild_dir is not None:
            shutil.rmtree(self.rebuild_dir, ignore_errors=True)


def _error(exc: BaseException) -> str:
    root = exc
    while root.__cause__ is not None:
        root = root.__cause__
    text = f"{type(root).__name__}: {root}".strip()
    if isinstance(root, AssertionError) and not str(root):
        frame = traceback.extract_tb(root.__traceback__)[-1]
        text += f"(assert at {Path(frame.filename).name}:{frame.lineno})"
    return text[:200]


def run_child(model_path: str, quant: str, method: str, repeats: int, verify: bool) -> dict[str, Any]:
    """Build, sync `repeats + 1` times (the first reported apart), measure; a JSON-able record."""
    record: dict[str, Any] = {"model": model_path, "quant": quant, "method": method, "repeats": repeats}
    start = time.perf_counter()
    bench = Bench(model_path, quant, method)
    record.update(build_s=time.perf_counter() - start, num_bytes=bench.num_bytes, num_tensors=len(bench.weights),
                  torch_threads=torch.get_num_threads())
    times, cpu_times, peaks, extras = [], [], [], []
    try:
        for _ in range(repeats + 1):
            seconds, cpu_seconds, peak, extra = measured(bench.sync)
            times.append(seconds)
            cpu_times.append(cpu_seconds)
            peaks.append(peak)
            extras.append(extra)
    except Exception as exc:  # a method failing is a result: the table shows it
        record.update(status="failed", error=_error(exc), num_ok=len(times))
        bench.close()
        return record
    record.update(status="ok", first_s=times[0], times_s=times[1:], median_s=statistics.median(times[1:]),
                  cpu_times_s=cpu_times[1:], cpu_median_s=statistics.median(cpu_times[1:]),
                  peak_rss_bytes=max(peaks), peak_rss_first_bytes=peaks[0], peak_rss_timed_bytes=max(peaks[1:]))
    if "num_tensors" in extras[-1]:  # what the sync itself received (rlsync's report)
        record["num_tensors"] = extras[-1]["num_tensors"]
    if "planned" in extras[-1]:  # the timed syncs replayed a sync plan (rlsync with plans on)
        record["planned"] = [e["planned"] for e in extras]
    if method == "rebuild":
        record["save_s_median"] = statistics.median(e["save_s"] for e in extras[1:])
    if "check_s" in extras[-1]:  # the share of rlsync's sync spent on the always-on NaN / Inf check
        record["check_s_median"] = statistics.median(e["check_s"] for e in extras[1:])
    if method in ("native", "native-shuffled"):
        bench.peak_live_bytes = bench.native_live_bytes()
    record["peak_live_bytes"] = bench.peak_live_bytes
    if verify:
        try:
            record["verify"] = f"ok ({bench.verify()} tensors)"
        except Exception as exc:  # a wrong result is a result too
            record["verify"] = "FAILED: " + _error(exc)
    bench.close()
    return record


def emit(record: dict[str, Any]) -> None:
    print(RESULT_PREFIX + json.dumps(record), flush=True)
