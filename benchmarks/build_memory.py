"""Peak memory of building an engine: `rlsync_fp8` against bf16 and against vLLM's own `fp8_per_channel`.

    .venv/bin/python benchmarks/build_memory.py              # bench model: bf16, fp8_per_channel, rlsync_fp8/channel
    .venv/bin/python benchmarks/build_memory.py --quick      # CI smoke: tiny model, rlsync_fp8/channel only
    .venv/bin/python benchmarks/build_memory.py --quick --quants bf16 fp8_per_channel rlsync_fp8/channel
    .venv/bin/python benchmarks/build_memory.py --quants bf16 rlsync_fp8/block --json mem.json
    .venv/bin/python benchmarks/build_memory.py --table mem.json

Why: before the bounded build, an `rlsync_fp8` engine first loaded the whole
model in bf16 and quantized it afterwards, so building it peaked above a bf16
engine. Now its linear (and expert) weights are created on the meta device
and each checkpoint shard is quantized on arrival: the build should never hold
more than one shard's bf16 weights. This measures it.

Each build runs in a fresh process (`--child`, one thread) that first imports
vLLM and rlsync's engine, then builds `VLLMEngine(model, quantization=...)`.
Linux only (`/proc/self`). Two windows:
- **model load**: vLLM's `BaseModelLoader.load_model` (create the model, load
  the checkpoint, process the weights), wrapped in the child only: the
  process's peak RSS (`VmHWM`, reset on entry by `echo 5 >
  /proc/self/clear_refs`) over its RSS on entry, and the peak anonymous memory
  (`RssAnon`, sampled every 2 ms by a thread) over its value on entry. This is
  where the weights' memory is, and it is the figure to read.
- **whole build**: the same over the RSS / RssAnon right before the build.
  It adds what every build allocates alike: vLLM's remaining imports and its
  KV cache (`VLLM_CPU_KVCACHE_SPACE`, 1 GiB here), so its ratios are diluted.
RSS also counts the checkpoint's file pages that the safetensors loader maps
(up to the checkpoint's size, in every build, and not memory the engine
holds), hence the anonymous figure beside it. `held` is the anonymous memory
the load (the build) left behind; after the build the child calls glibc's
`malloc_trim(0)`, which returns freed heap pages to the system, so the build's
held figure after it is what the engine really keeps (the difference: freed
memory the allocator had kept). Expected weight sizes: bf16 2 B
per parameter; FP8 1 B per linear projection weight element plus its scales,
2 B for the rest (embeddings, norms, the LM head); `engine MiB` sums the
built engine's parameters. `built on arrival` counts the `rlsync_fp8` layers
whose first load quantized every shard on arrival (the plugin's own flag,
`quant_method.built_on_arrival`): all of them means no layer ever held its
bf16 weight.

Limitations:
1. Sampled anonymous memory can miss a spike shorter than the period; `VmHWM`
   cannot, but it includes file pages.
2. CPU only. `gpu_reload.py` measures a reload's device memory on a GPU
   (`max_memory_allocated`), not a build's: the GPU machine has no vLLM.
3. The allocator may keep freed pages: they count in the peak (they were
   used) and in the held figures until `malloc_trim`.
4. The first `rlsync_fp8` load compiles the fused quantizer (Inductor; cached
   on disk for later processes): its code and buffers are in the load's
   figures, a few tens of MiB whatever the model's size (24 MiB on the tiny
   model).
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _floor import CheckpointFacts  # noqa: E402
from _methods import _status_kib, emit, quant_kwargs, reset_peak_rss  # noqa: E402
from _run import config_fields, env_line, model_parser, run_model  # noqa: E402
from sync import DENSE_MODELS, model_path  # noqa: E402

QUANTS = ("bf16", "fp8_per_channel", "rlsync_fp8/channel")
QUICK_QUANTS = ("rlsync_fp8/channel",)
SAMPLE_PERIOD_S = 0.002
KIB = 1024


@dataclasses.dataclass(kw_only=True, slots=True)
class BuildMemoryConfig:
    """What one run measures."""

    model: str = "bench"
    """`bench` (BENCH_SPEC, ~250M parameters) or `tiny`."""
    quants: tuple[str, ...] = QUANTS
    """`bf16`, `fp8_per_channel`, `rlsync_fp8/<scheme>`; each built once, in its own process."""
    quick: bool = False
    """The smoke-test variant (recorded so the table knows which plan ran)."""
    timeout_s: float = 900.0
    """Per-build limit."""
    json_path: str | None = None
    """Also write every record and the environment to this file."""

    def __post_init__(self) -> None:
        if self.model not in DENSE_MODELS:
            raise ValueError(f"unknown model {self.model!r}; choose from {', '.join(DENSE_MODELS)}")


# ------------------------------------------------------------------ parent
def run(cfg: BuildMemoryConfig) -> dict[str, Any]:
    path = model_path(cfg.model)
    cells = [([sys.executable, __file__, "--child", "--model-path", path, "--quant", q], {"quant": q}) for q in cfg.quants]
    return run_model(cfg, path, cells, _progress)


def _progress(r: dict[str, Any]) -> str:
    if r["status"] != "ok":
        return f"{r['quant']:<20} FAILED {r['error']}"
    return (f"{r['quant']:<20} load: peak RSS +{_mib(r['load_peak_rss_bytes'])} MiB, peak anon "
            f"+{_mib(r['load_peak_anon_bytes'])} MiB; build {r['build_s']:.1f} s")


# ------------------------------------------------------------------ child
class AnonSampler:
    """A thread reading this process's `RssAnon` every `period_s`: (seconds, bytes) samples."""

    def __init__(self, period_s: float = SAMPLE_PERIOD_S) -> None:
        self.period_s = period_s
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="anon-sampler", daemon=True)

    def sample(self) -> int:
        value = _status_kib("RssAnon") * KIB
        self.samples.append((time.perf_counter(), value))
        return value

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.period_s)

    def peak(self, start: float, end: float) -> int:
        return max(v for t, v in self.samples if start <= t <= end)

    def __enter__(self) -> AnonSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class LoadWindow:
    """Wraps vLLM 0.32's `BaseModelLoader.load_model` for the duration of a build (this process only): on entry
    the peak RSS so far is kept and `VmHWM` reset; on exit the window's peak RSS is read."""

    def __init__(self, sampler: AnonSampler) -> None:
        self.sampler = sampler
        self.facts: dict[str, Any] = {}

    def __enter__(self) -> LoadWindow:
        from vllm.model_executor.model_loader.base_loader import BaseModelLoader

        self._cls, self._original = BaseModelLoader, BaseModelLoader.load_model
        original, facts, sampler = self._original, self.facts, self.sampler

        def load_model(loader, *args: Any, **kwargs: Any):
            facts["hwm_before_bytes"] = _status_kib("VmHWM") * KIB
            reset_peak_rss()
            facts["rss_start_bytes"] = _status_kib("VmRSS") * KIB
            facts["anon_start_bytes"], facts["t_start"] = sampler.sample(), time.perf_counter()
            model = original(loader, *args, **kwargs)
            facts["t_end"], facts["anon_end_bytes"] = time.perf_counter(), sampler.sample()
            facts["hwm_bytes"] = _status_kib("VmHWM") * KIB
            return model

        BaseModelLoader.load_model = load_model
        return self

    def __exit__(self, *exc: object) -> None:
        self._cls.load_model = self._original


def built_on_arrival(model) -> tuple[int, int]:
    """(layers the plugin built on arrival, layers with an `rlsync_fp8` method); (0, 0) without the plugin."""
    methods = [m.quant_method for m in model.modules() if hasattr(getattr(m, "quant_method", None), "built_on_arrival")]
    return sum(bool(q.built_on_arrival) for q in methods), len(methods)


def preimport(quantization: str | None) -> None:
    """Import, before the baseline, the modules every build of this kind imports anyway (vLLM's model loader, the
    quantization config's module, rlsync's plugin), so the windows count the build, not first imports."""
    from vllm.model_executor.layers.quantization import get_quantization_config
    from vllm.model_executor.model_loader import base_loader  # noqa: F401
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    if quantization is not None:
        get_quantization_config(quantization)


def child(model_path: str, quant: str) -> dict[str, Any]:
    from rlsync.adapters.vllm_engine import import_vllm
    from rlsync.engine import VLLMEngine

    import_vllm()
    kwargs = quant_kwargs(quant)
    preimport(kwargs["quantization"])
    gc.collect()
    rss_before, anon_before = _status_kib("VmRSS") * KIB, _status_kib("RssAnon") * KIB
    reset_peak_rss()
    with AnonSampler() as sampler, LoadWindow(sampler) as window:
        start = time.perf_counter()
        engine = VLLMEngine(model_path, **kwargs)
        build_s = time.perf_counter() - start
        end = time.perf_counter()
    w = window.facts
    hwm = max(w["hwm_before_bytes"], _status_kib("VmHWM") * KIB)
    held = _status_kib("RssAnon") * KIB - anon_before
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back: what stays is what the process holds
    arrived, num_methods = built_on_arrival(engine.model)
    return {
        "quant": quant, "status": "ok", "build_s": build_s, "load_s": w["t_end"] - w["t_start"],
        "rss_before_bytes": rss_before, "anon_before_bytes": anon_before,
        "build_peak_rss_bytes": hwm - rss_before, "build_peak_anon_bytes": sampler.peak(start, end) - anon_before,
        "load_peak_rss_bytes": w["hwm_bytes"] - w["rss_start_bytes"],
        "load_peak_anon_bytes": sampler.peak(w["t_start"], w["t_end"]) - w["anon_start_bytes"],
        "load_held_anon_bytes": w["anon_end_bytes"] - w["anon_start_bytes"],
        "build_held_anon_bytes": held, "build_trimmed_anon_bytes": _status_kib("RssAnon") * KIB - anon_before,
        "engine_bytes": sum(p.nbytes for p in engine.model.parameters()),
        "built_on_arrival": arrived, "num_plugin_layers": num_methods, "num_samples": len(sampler.samples),
    }


# ------------------------------------------------------------------ table
def _mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def _held(record: dict[str, Any]) -> str:
    """Anonymous memory the build left, before (after) `malloc_trim`; `-` in runs from before it was recorded."""
    if "build_held_anon_bytes" not in record:
        return "-"
    return f"{_mib(record['build_held_anon_bytes'])} ({_mib(record['build_trimmed_anon_bytes'])})"


def expected_bytes(facts: CheckpointFacts, quant: str) -> int:
    """Weights without scales: bf16 2 B per parameter; FP8 1 B per linear projection weight element, 2 B for the rest."""
    if quant == "bf16":
        return 2 * facts.num_params
    return facts.num_quantized + 2 * (facts.num_params - facts.num_quantized)


def format_table(result: dict[str, Any]) -> str:
    facts = CheckpointFacts(**result["facts"])
    ok = {r["quant"]: r for r in result["records"] if r["status"] == "ok"}
    lines = [
        env_line(result["env"]),
        "",
        f"**{result['model']}** ({facts.num_params / 1e6:.1f}M parameters, {_mib(facts.num_bytes)} MiB bf16 checkpoint, "
        f"{_mib(facts.max_tensor_bytes)} MiB largest tensor). One fresh process per build; MiB over the window's start "
        "(model load: vLLM's `load_model`; whole build: from after `import vllm` to the built engine, KV cache included).",
        "",
        "| quant | load: peak RSS | load: peak anon | load: held anon | build: peak RSS | build: peak anon | "
        "build: held anon (after malloc_trim) | engine MiB | expected weights MiB | built on arrival | load s | build s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for quant, r in ((r["quant"], r) for r in result["records"]):
        if r["status"] != "ok":
            lines.append(f"| {quant} | failed: {r['error']} | | | | | | | | | | |")
            continue
        arrival = f"{r['built_on_arrival']} / {r['num_plugin_layers']}" if r["num_plugin_layers"] else "-"
        lines.append(
            f"| {quant} | {_mib(r['load_peak_rss_bytes'])} | {_mib(r['load_peak_anon_bytes'])} | "
            f"{_mib(r['load_held_anon_bytes'])} | {_mib(r['build_peak_rss_bytes'])} | {_mib(r['build_peak_anon_bytes'])} | "
            f"{_held(r)} | "
            f"{_mib(r['engine_bytes'])} | {_mib(expected_bytes(facts, quant))} | {arrival} | {r['load_s']:.1f} | "
            f"{r['build_s']:.1f} |"
        )
    lines += ["", *ratio_lines(ok)]
    return "\n".join(lines) + "\n"


def ratio_lines(ok: dict[str, dict[str, Any]]) -> list[str]:
    """Each `rlsync_fp8` build's peaks over the bf16 build's and over vLLM's `fp8_per_channel` build's."""
    keys = (("load_peak_anon_bytes", "load peak anon"), ("load_peak_rss_bytes", "load peak RSS"),
            ("build_peak_anon_bytes", "build peak anon"), ("build_peak_rss_bytes", "build peak RSS"))
    lines = []
    for quant in (q for q in ok if q.startswith("rlsync_fp8")):
        for base in ("bf16", "fp8_per_channel"):
            if base in ok:
                ratios = ", ".join(f"{label} {ok[quant][k] / max(ok[base][k], 1):.2f}" for k, label in keys)
                lines.append(f"- {quant} / {base}: {ratios}")
    return lines


# ------------------------------------------------------------------ CLI
def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, BuildMemoryConfig | None]:
    args = model_parser(__doc__, f"CI smoke: tiny model, {' '.join(QUICK_QUANTS)}", DENSE_MODELS, QUANTS).parse_args(argv)
    if args.child:
        return args, None
    fields = config_fields(args, {"model": "tiny", "quants": QUICK_QUANTS}, ("model", "quants"))
    return args, BuildMemoryConfig(json_path=args.json_path, quick=args.quick, **fields)


def main(argv: list[str] | None = None) -> int:
    args, cfg = parse_args(argv)
    if args.table:
        for path in args.table:
            print(format_table(json.loads(Path(path).read_text())))
        return 0
    if cfg is None:
        emit(child(args.model_path, args.quant))
        return 0
    result = run(cfg)
    print(format_table(result))
    return 1 if any(r["status"] != "ok" for r in result["records"]) else 0


if __name__ == "__main__":
    sys.exit(main())
