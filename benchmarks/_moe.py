"""The MoE section of `sync.py`: which Qwen3-MoE checkpoints, which cells, and its two tables.

Why a section of its own: on this CPU vLLM's own FP8 (`fp8_per_channel`)
cannot build an MoE engine, so the baseline is vLLM's native bf16 reload of
the same model, and an MoE sync has a question a dense one does not: does its
time grow with bytes or with the number of tensors? A layer of 256 experts
sends 768 checkpoint tensors where a dense layer sends 7.

Models (built locally by `rlsync.default_model`, nothing downloaded):
- `moe`: 16 layers x 32 experts (top 4, expert width 256), hidden 1024,
  16/4 heads, vocab 32768 untied: 512M parameters, 977 MiB bf16.
- `moe-e8`, `moe-e64`, `moe-e256`: the same model with 8 / 64 / 256 experts
  per layer and the expert width scaled (1024 / 128 / 32) so that
  experts x width, hence the expert bytes, stay those of `moe` (only the
  router gates, experts x hidden, grow: 0.8% more bytes at 256 experts).
  With `moe` they form the scaling series (8, 32, 64, 256 experts). The
  narrowest width is 32 on purpose: vLLM's CPU experts pad a width that is
  not a multiple of 32 (a different kernel format, a different reload path),
  which would mix a second effect into a series about tensor counts.
- `moe-tiny`, `moe-tiny-e32`: `family_spec("qwen3_moe")` (2 layers x 8
  experts, hidden 256) and its 32-expert twin, for the `--quick` smoke run.

Limitations:
1. One family (Qwen3-MoE: every layer sparse, no shared expert); Mixtral and
   Qwen2-MoE are not timed here (tests/integration/test_moe_sync.py covers
   their correctness).
2. The native baseline is fed checkpoint-format tensors (transformers keeps
   experts fused in memory; rlsync's source splits them back before any sync,
   untimed), so it does not pay the conversion rlsync's timed sync includes.
3. The scaling series runs the channel scheme only for FP8; the main table
   has every scheme at 32 experts.
4. vLLM 0.32's native reload skips the CPU experts' prepack (its verify
   fails), so its times are those of an incomplete reload: rlsync's bf16
   sync runs that prepack on every sync.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from rlsync.default_model import BENCH_SHAPE, TinyModelSpec, family_spec

EXPERT_WIDTH_TOTAL = 8192
"""num_experts x moe_intermediate_size of every model in the scaling series (fixed total expert bytes)."""

MOE_SPEC = family_spec("qwen3_moe", **BENCH_SHAPE, num_experts=32, num_experts_per_tok=4,
                       moe_intermediate_size=EXPERT_WIDTH_TOTAL // 32)


def with_experts(spec: TinyModelSpec, num_experts: int, total: int) -> TinyModelSpec:
    """`spec` with `num_experts` experts per layer, each `total // num_experts` wide (same expert bytes)."""
    if total % num_experts:
        raise ValueError(f"{total} is not a multiple of {num_experts} experts")
    return dataclasses.replace(spec, num_experts=num_experts, moe_intermediate_size=total // num_experts)


_TINY = family_spec("qwen3_moe")
MOE_MODELS: dict[str, TinyModelSpec] = {
    "moe": MOE_SPEC,
    **{f"moe-e{n}": with_experts(MOE_SPEC, n, EXPERT_WIDTH_TOTAL) for n in (8, 64, 256)},
    "moe-tiny": _TINY,
    "moe-tiny-e32": with_experts(_TINY, 32, _TINY.num_experts * _TINY.moe_intermediate_size),
}
"""Every MoE checkpoint `sync.py --models` accepts."""

FP8_SCHEMES = ("tensor", "channel", "block")
MAIN_CELLS = (("bf16", "rlsync"), ("bf16", "native"), ("fp8_per_channel", "native"),
              *((f"rlsync_fp8/{s}", "rlsync") for s in FP8_SCHEMES))
"""(quant, method) of the main table: rlsync in bf16 and every FP8 scheme against vLLM's native bf16 reload
(vLLM's own FP8 is attempted so the table shows why it is not the baseline)."""
SCALING_CELLS = (("bf16", "rlsync"), ("bf16", "rlsync-noplan"), ("bf16", "native"), ("rlsync_fp8/channel", "rlsync"),
                 ("rlsync_fp8/channel", "rlsync-noplan"), ("bf16", "rlsync-record"), ("rlsync_fp8/channel", "rlsync-record"))
"""(quant, method) measured at every expert count; `rlsync-noplan` is rlsync with `sync_plan=False`;
`rlsync-record` (every sync a recording one) runs only when named in `--methods`."""
QUICK_MAIN_CELLS = (("bf16", "rlsync"), ("rlsync_fp8/channel", "rlsync"))
"""The smoke run's cells: rlsync only (vLLM's native reload runs in `sync.py --quick`'s smoke run)."""
QUICK_SCALING_CELLS = (("bf16", "rlsync"),)


@dataclasses.dataclass(frozen=True, slots=True)
class MoePlan:
    """Which model is the main one, which form the scaling series, and what runs on each."""

    main: str
    scaling: tuple[str, ...]
    main_cells: tuple[tuple[str, str], ...]
    scaling_cells: tuple[tuple[str, str], ...]

    def cells(self) -> list[tuple[str, str, str]]:
        """(model, quant, method) in run order, each once (the main model is also in the series)."""
        out = [(self.main, q, m) for q, m in self.main_cells]
        out += [(name, q, m) for name in self.scaling for q, m in self.scaling_cells]
        return list(dict.fromkeys(out))


PLAN = MoePlan(main="moe", scaling=("moe-e8", "moe", "moe-e64", "moe-e256"), main_cells=MAIN_CELLS,
               scaling_cells=SCALING_CELLS)
QUICK_PLAN = MoePlan(main="moe-tiny", scaling=("moe-tiny", "moe-tiny-e32"), main_cells=QUICK_MAIN_CELLS,
                     scaling_cells=QUICK_SCALING_CELLS)


# ------------------------------------------------------------------ tables
def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def short_verify(text: str) -> str:
    """A verify outcome for a table cell: `ok (...)`, or the first tensor that differs."""
    if not text.startswith("FAILED"):
        return text
    body = text.removeprefix("FAILED: ").replace("SyncError: verify failed: ", "")
    items = [item.replace(": bits differ from the reference", " differs") for item in body.split("; ")]
    return "**FAILED**: " + items[0] + ("; ..." if len(items) > 1 else "")


def _records(result: dict[str, Any]) -> dict[tuple[str, str, str], dict[str, Any]]:
    return {(m["name"], r["quant"], r["method"]): r for m in result["models"] for r in m["records"]}


def _spec(result: dict[str, Any], name: str) -> dict[str, Any]:
    return next(m["spec"] for m in result["models"] if m["name"] == name)


def _failed(r: dict[str, Any]) -> str:
    return "failed: " + r["error"].replace("|", "/")


def _ratio(r: dict[str, Any], base: dict[str, Any]) -> str:
    """Wall and CPU median of `r` over those of `base`."""
    return f"{r['median_s'] / base['median_s']:.2f} / {r['cpu_median_s'] / base['cpu_median_s']:.2f}"


def main_table(result: dict[str, Any], plan: MoePlan) -> list[str]:
    """Every main cell against vLLM's native bf16 reload and the copy floor."""
    model = next(m for m in result["models"] if m["name"] == plan.main)
    records = _records(result)
    base = records.get((plan.main, "bf16", "native"))
    if base is not None and base["status"] != "ok":
        base = None
    lines = ["| quant | method | median s | CPU s | vs native bf16 (wall / CPU) | x floor | checkpoint tensors "
             "| peak extra RSS MiB (first / timed syncs) | backend live MiB | verify (engine tensors) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for quant, method in plan.main_cells:
        r = records.get((plan.main, quant, method))
        if r is None:
            continue
        if r["status"] != "ok":
            lines.append(f"| {quant} | {method} | {_failed(r)} | | | | | | | |")
            continue
        floor = model["floor_s"]["bf16" if quant == "bf16" else "fp8"]
        lines.append(f"| {quant} | {method} | {r['median_s']:.3f} | {r['cpu_median_s']:.3f} | "
                     f"{'-' if base is None else _ratio(r, base)} | {r['median_s'] / floor:.1f} | {r['num_tensors']} | "
                     f"{_mib(r['peak_rss_first_bytes'])} / {_mib(r.get('peak_rss_timed_bytes'))} | "
                     f"{_mib(r.get('peak_live_bytes'))} | "
                     f"{short_verify(r.get('verify', '-'))} |")
    return lines


def scaling_table(result: dict[str, Any], plan: MoePlan) -> list[str]:
    """Each scaling cell at every expert count: seconds, tensors, bytes, and the ratio to the fewest experts."""
    records = _records(result)
    present = [n for n in plan.scaling if any(m["name"] == n for m in result["models"])]
    if len(present) < 2:
        return []
    lines = ["| quant | method | experts x width | checkpoint tensors | MiB | median s | CPU s "
             "| vs fewest experts (wall / CPU) | CPU us per tensor beyond the fewest |",
             "|---|---|---|---|---|---|---|---|---|"]
    summary = []
    for quant, method in plan.scaling_cells:
        first = records.get((present[0], quant, method))
        if first is not None and first["status"] != "ok":
            first = None
        for name in present:
            r, spec = records.get((name, quant, method)), _spec(result, name)
            if r is None:
                continue
            shape = f"{spec['num_experts']} x {spec['moe_intermediate_size']}"
            if r["status"] != "ok":
                lines.append(f"| {quant} | {method} | {shape} | | | {_failed(r)} | | | |")
                continue
            extra = r["num_tensors"] - first["num_tensors"] if first else 0
            per = f"{(r['cpu_median_s'] - first['cpu_median_s']) / extra * 1e6:.0f}" if extra else "-"
            lines.append(f"| {quant} | {method} | {shape} | {r['num_tensors']} | {_mib(r['num_bytes'])} | "
                         f"{r['median_s']:.3f} | {r['cpu_median_s']:.3f} | {_ratio(r, first) if first else '-'} | {per} |")
        last = records.get((present[-1], quant, method))
        if first and last and last["status"] == "ok":
            wall, cpu = _ratio(last, first).split(" / ")
            summary.append(f"- {quant} {method}: {_spec(result, present[-1])['num_experts']} vs "
                           f"{_spec(result, present[0])['num_experts']} experts per layer "
                           f"({last['num_tensors']} vs {first['num_tensors']} tensors, same expert bytes): "
                           f"wall {wall}x, CPU {cpu}x")
    return lines + [""] + summary


def format_moe(result: dict[str, Any]) -> str:
    """The MoE section's two tables (for whichever of their models the run holds)."""
    plan = QUICK_PLAN if result["config"].get("quick") else PLAN
    names = {m["name"] for m in result["models"]}
    out = []
    if plan.main in names:
        out += [f"**MoE main table** ({plan.main}): medians of the timed syncs; CPU s is the process's CPU time "
                "(all threads) over the same syncs, which moves less than wall time with other people's load.", ""]
        out += main_table(result, plan) + [""]
    table = scaling_table(result, plan)
    if table:
        out += ["**MoE scaling** (same expert bytes, more and smaller experts):", ""] + table + [""]
    return "\n".join(out)
