"""`rlsync` command line: run a recipe from a YAML config, plot a run.

    rlsync run CONFIG [key=value ...]
    rlsync run CONFIG resume=true          # continue a run from its newest complete checkpoint
    rlsync plot RUN_DIR [--out PNG]

The config's `recipe:` key names the recipe; the recipe module's config
dataclass validates every key and type before any work starts. Exit status: 0
done, 2 config error (nothing run), 1 the run stopped (`DivergenceError`: the
loss or gradients became non-finite; `CheckpointError`: no checkpoint to trust). Multi-process
runs go through `torchrun` / `deepspeed` launching `rlsync run` (or
`python -m rlsync.cli run`), never a launcher of our own.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from rlsync.config import load_config
from rlsync.config.loader import read_yaml
from rlsync.errors import CheckpointError, ConfigError, DivergenceError

# recipe name -> module with `CONFIG` (config dataclass) and `main(config)`
RECIPES = {
    "grpo": ("recipes.grpo", "GRPOConfig"),
    "ppo": ("recipes.ppo", "PPOConfig"),
    "trl_grpo": ("recipes.trl_grpo", "TrlGRPOConfig"),
}


def load_recipe_config(path: str | Path, overrides: list[str] | None = None):
    """(recipe module, validated config) for a YAML config file."""
    path = Path(path)
    raw = read_yaml(path) or {}
    recipe = next((v.partition("=")[2] for v in overrides or [] if v.startswith("recipe=")), None)
    recipe = recipe or (raw.get("recipe") if isinstance(raw, dict) else None)
    if recipe not in RECIPES:
        raise ConfigError(f"recipe: {recipe!r} is not one of {', '.join(sorted(RECIPES))} (set `recipe:` in {path})")
    module_name, class_name = RECIPES[recipe]
    module = importlib.import_module(module_name)
    return module, load_config(getattr(module, class_name), path, overrides)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlsync", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a recipe from a YAML config")
    run.add_argument("config", help="YAML config, e.g. configs/grpo/tiny_cpu_fp8.yaml")
    run.add_argument("overrides", nargs="*", help="key=value overrides, e.g. grpo.steps=5 resume=true")
    plot = sub.add_parser("plot", help="plot a run's reward, KL / mismatch and sync time to a PNG")
    plot.add_argument("run_dir", help="run directory (holds metrics.jsonl)")
    plot.add_argument("--out", default=None, help="PNG path (default: RUN_DIR/metrics.png)")
    args = parser.parse_args(argv)

    if args.command == "plot":
        from rlsync.rl.plot import plot_run

        try:
            out = plot_run(args.run_dir, args.out)
        except (FileNotFoundError, ValueError) as exc:
            print(f"rlsync: plot: {exc}", file=sys.stderr)
            return 2
        print(f"rlsync: wrote {out}")
        return 0

    try:
        module, config = load_recipe_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"rlsync: config error: {exc}", file=sys.stderr)
        return 2
    try:
        result = module.main(config)
    except ConfigError as exc:  # checks that need the model or run directory on disk
        print(f"rlsync: config error: {exc}", file=sys.stderr)
        return 2
    except (DivergenceError, CheckpointError) as exc:  # the run stopped; what it wrote before is intact
        print(f"rlsync: run stopped: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if result is not None and hasattr(result, "path"):
        print(f"rlsync: run directory {result.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
