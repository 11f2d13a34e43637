"""The C kernel of another commit against this checkout's, in one process: before / after for a kernel change.

    .venv/bin/python benchmarks/kernel_ab.py --against HEAD~1              # default shapes, 9 rounds
    .venv/bin/python benchmarks/kernel_ab.py --against 59b00eb --rounds 15 --threads 2
    .venv/bin/python benchmarks/kernel_ab.py --quick                        # CI smoke: small shapes, 2 rounds

Why: on this shared machine two processes minutes apart differ by 1.3-1.5x for
the same work, more than most kernel changes are worth. Here both libraries
are built and loaded in one process (`cpu_kernel._library` keys each build by
its source), and every round times every shape with one, then the other,
reversing the order every other round. Reported: the median per shape and
build, and after / before.

The other commit's source is read with `git show` and taken as the string
literal assigned to `SOURCE` in `rlsync/quant/cpu_kernel_source.py` (parsed,
never executed). Shapes are stacked weights (S, N, K) quantized by
`cpu_kernel.stacked_into` (channel, tensor) or `cpu_kernel.block_into` (one weight, 128 x 128 blocks).
"""

from __future__ import annotations

import argparse
import ast
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rlsync.quant import cpu_kernel  # noqa: E402

SHAPES = (("channel", 8, 1024, 1024), ("channel", 256, 1024, 32), ("channel", 1, 151936, 896),
          ("tensor", 1, 151936, 896), ("block", 1, 151936, 896))
"""(scheme, experts, rows, columns): 8 and 256 experts' down projections (same bytes), a vocabulary matrix."""
QUICK_SHAPES = (("channel", 2, 256, 256), ("channel", 16, 256, 32), ("tensor", 1, 1024, 896), ("block", 1, 1024, 896))
"""`--quick` (CI smoke): the same paths, small."""


def source_at(rev: str) -> str:
    """The kernel source at git revision `rev`."""
    done = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:rlsync/quant/cpu_kernel_source.py"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"git show {rev}: {done.stderr.strip()}")
    for node in ast.parse(done.stdout).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "SOURCE" for t in node.targets):
            return ast.literal_eval(node.value)
    raise SystemExit(f"{rev}: no SOURCE string in rlsync/quant/cpu_kernel_source.py")


def use(source: str) -> None:
    """Make `source`'s library the one `cpu_kernel` calls (built once, then loaded from its cache)."""
    cpu_kernel._SOURCE = source
    cpu_kernel._library.cache_clear()
    lib = cpu_kernel._library()
    if isinstance(lib, str):
        raise SystemExit(f"kernel build failed: {lib}")


def case(scheme: str, s: int, n: int, k: int):
    """One kernel call for `scheme` on S stacked (N, K) weights (block: one weight, 128 x 128 blocks)."""
    w = torch.randn(s, n, k).to(torch.bfloat16)
    q = torch.empty(s, n, k, dtype=torch.float8_e4m3fn)
    if scheme == "block":
        scale = torch.empty(-(-n // 128), -(-k // 128))
        return lambda: cpu_kernel.block_into(w[0], (128, 128), q[0], scale)
    scale = torch.empty((s, n, 1) if scheme == "channel" else (s, 1, 1))
    return lambda: cpu_kernel.stacked_into(scheme, w, q, scale)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--against", default="HEAD", help="git revision whose kernel is 'before' (default HEAD)")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", dest="json_path", default=None)
    p.add_argument("--quick", action="store_true", help="CI smoke: small shapes, 2 rounds")
    args = p.parse_args(argv)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    if args.quick:
        args.rounds = 2
    if args.rounds < 1:
        p.error("--rounds: at least 1")
    torch.set_num_threads(args.threads)
    sources = {"before": source_at(args.against), "after": cpu_kernel._SOURCE}
    for src in sources.values():
        use(src)
    cases = {shape: case(*shape) for shape in shapes}
    for shape, fn in cases.items():  # every path runs once before timing, and a shape it does not take fails here
        if fn() is False:
            raise SystemExit(f"{shape}: the kernel does not take this shape")
    times: dict[tuple, dict[str, list[float]]] = {shape: {"before": [], "after": []} for shape in shapes}
    for r in range(args.rounds):
        for build in ("before", "after") if r % 2 == 0 else ("after", "before"):
            use(sources[build])
            for shape, fn in cases.items():
                start = time.perf_counter()
                fn()
                times[shape][build].append(time.perf_counter() - start)
    rows = []
    print(f"kernel of {args.against} (before) against this checkout (after); {args.threads} thread(s), "
          f"{args.rounds} rounds, median ms\n\n| scheme | shape | before | after | after / before |\n|---|---|---|---|---|")
    for shape, t in times.items():
        before, after = statistics.median(t["before"]), statistics.median(t["after"])
        rows.append({"scheme": shape[0], "shape": list(shape[1:]), "before_s": before, "after_s": after})
        print(f"| {shape[0]} | {' x '.join(map(str, shape[1:]))} | {before * 1e3:.2f} | {after * 1e3:.2f} "
              f"| {after / before:.2f} |")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps({"against": args.against, "rounds": args.rounds,
                                                    "threads": args.threads, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
