"""`rlsync` command line: run a recipe from a YAML config, plot a run, list and copy the shipped configs.

    rlsync run CONFIG [key=value ...]
    rlsync run CONFIG resume=true          # continue a run from its newest complete checkpoint
    rlsync run -v CONFIG                   # vLLM's log on the terminal too (it is always in RUN_DIR/run.log)
    rlsync run grpo/tiny_cpu_fp8           # a shipped config by name (a file that exists wins)
    rlsync plot RUN_DIR [--out PNG]
    rlsync export RUN_DIR OUT [--step N] [--force]   # the policy as a Hugging Face checkpoint (LoRA merged)
    rlsync ls                              # the shipped configs and the recipes
    rlsync cp NAME DEST [--force]          # copy a shipped config to edit
    rlsync --version

The config's `recipe:` key names the recipe; the recipe module's config
dataclass validates every key and type before any work starts. Exit status: 0
done, 2 config error (nothing run), 1 the run stopped (`DivergenceError`: the
loss or gradients became non-finite; `CheckpointError`: no checkpoint to trust; for `export`, also an
`ExportError`: the result would not match the base checkpoint, and OUT is left as it was). Multi-process
runs go through `torchrun` / `deepspeed` launching `rlsync run` (or
`python -m rlsync.cli run`), never a launcher of our own.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.metadata
import importlib.util
import shutil
import sys
from pathlib import Path

from rlsync.config import load_config
from rlsync.config.loader import read_yaml
from rlsync.config.shipped import configs_dir, describe, resolve_config, shipped_config, shipped_configs
from rlsync.errors import CheckpointError, ConfigError, DivergenceError, ExportError

# recipe name -> module with `CONFIG` (config dataclass) and `main(config)`. The repository's
# `recipes/` directory is installed as `rlsync.recipes` (pyproject.toml: package-dir).
RECIPES = {
    "grpo": ("rlsync.recipes.grpo", "GRPOConfig"),
    "ppo": ("rlsync.recipes.ppo", "PPOConfig"),
    "trl_grpo": ("rlsync.recipes.trl_grpo", "TrlGRPOConfig"),
}


def load_recipe_config(path: str | Path, overrides: list[str] | None = None):
    """(recipe module, validated config) for a YAML config file or a shipped config's name."""
    path = resolve_config(path)
    raw = read_yaml(path) or {}
    recipe = next((v.partition("=")[2] for v in overrides or [] if v.startswith("recipe=")), None)
    recipe = recipe or (raw.get("recipe") if isinstance(raw, dict) else None)
    if recipe not in RECIPES:
        raise ConfigError(f"recipe: {recipe!r} is not one of {', '.join(sorted(RECIPES))} (set `recipe:` in {path})")
    module_name, class_name = RECIPES[recipe]
    module = importlib.import_module(module_name)
    return module, load_config(getattr(module, class_name), path, overrides)


def version() -> str:
    """The installed distribution's version (`rlsync --version`)."""
    try:
        return importlib.metadata.version("rlsync")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (rlsync is not installed; run scripts/setup.sh)"


def recipe_summary(module_name: str) -> str:
    """The first line of a recipe module's docstring, read without importing the recipe (torch, vLLM)."""
    spec = importlib.util.find_spec(module_name)
    if spec is None or spec.origin is None:
        raise ConfigError(f"recipe module {module_name} is not installed; reinstall rlsync")
    doc = ast.get_docstring(ast.parse(Path(spec.origin).read_text(encoding="utf-8"))) or ""
    return doc.splitlines()[0] if doc else ""


def list_shipped() -> str:
    """What `rlsync ls` prints: every shipped config (name, recipe, first header line), then every recipe."""
    configs = shipped_configs()
    width = max(map(len, configs), default=0)
    lines = [f"configs ({configs_dir()}); run one with `rlsync run NAME`, copy it with `rlsync cp NAME DEST`:"]
    for name, path in configs.items():
        recipe, summary = describe(path)
        lines.append(f"  {name:<{width}}  {recipe:<8}  {summary}")
    lines.append("recipes (a config's `recipe:` key):")
    for name, (module_name, _) in sorted(RECIPES.items()):
        lines.append(f"  {name:<8}  {module_name:<24}  {recipe_summary(module_name)}")
    return "\n".join(lines)


def copy_shipped(name: str, dest: str | Path, *, force: bool = False) -> Path:
    """Copy shipped config `name` to `dest` (a file, or a directory to copy into); an existing file only if `force`."""
    source = shipped_config(name)
    into_dir = str(dest).endswith(("/", "\\"))
    dest = Path(dest)
    if into_dir and not dest.is_dir():
        raise ConfigError(f"directory {dest} does not exist")
    if dest.is_dir():
        dest = dest / source.name
    if dest.exists() and not force:
        raise ConfigError(f"{dest} exists; pass --force to overwrite it")
    if not dest.parent.is_dir():
        raise ConfigError(f"directory {dest.parent} does not exist")
    shutil.copyfile(source, dest)
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlsync", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"rlsync {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a recipe from a YAML config")
    run.add_argument("config", help="YAML config file, or a shipped config's name, e.g. grpo/tiny_cpu_fp8")
    run.add_argument("overrides", nargs="*", help="key=value overrides, e.g. grpo.steps=5 resume=true")
    run.add_argument("-v", "--verbose", action="store_true",
                     help="also print vLLM's log (always in RUN_DIR/run.log); same as run.verbose=true")
    plot = sub.add_parser("plot", help="plot a run's reward, KL / mismatch and sync time to a PNG")
    plot.add_argument("run_dir", help="run directory (holds metrics.jsonl)")
    plot.add_argument("--out", default=None, help="PNG path (default: RUN_DIR/metrics.png)")
    export = sub.add_parser(
        "export", help="write a run's policy as a Hugging Face checkpoint (safetensors, config, tokenizer)",
        description="Write the policy of RUN_DIR's newest intact checkpoint (or --step N) into OUT as a Hugging "
                    "Face checkpoint that `vllm serve OUT` and `from_pretrained(OUT)` load: LoRA merged, the same "
                    "tensor names, shapes and dtypes as the base model the run started from. OUT appears only "
                    "when complete. Works on rlsync's recipes (checkpoints/step_N) and on the trl recipe "
                    "(trl/checkpoint-N); a run saves checkpoints when run.checkpoint_every > 0.")
    export.add_argument("run_dir", help="run directory (holds config.yaml and checkpoints), e.g. runs/grpo-tiny-fp8")
    export.add_argument("out", help="directory to write; must not exist or be empty, unless --force")
    export.add_argument("--step", type=int, default=None, metavar="N",
                        help="the checkpoint of step N (default: the newest intact one)")
    export.add_argument("--force", action="store_true",
                        help="replace OUT if it holds files (only once the export is complete)")
    sub.add_parser("ls", help="list the shipped configs and the recipes")
    cp = sub.add_parser("cp", help="copy a shipped config to DEST, to edit and run it")
    cp.add_argument("name", help="shipped config name, e.g. grpo/tiny_cpu_fp8 (`rlsync ls` lists them)")
    cp.add_argument("dest", help="the file to write, or a directory to copy into")
    cp.add_argument("--force", action="store_true", help="overwrite DEST if it exists")
    args = parser.parse_args(argv)

    if args.command in ("ls", "cp"):
        try:
            if args.command == "ls":
                print(list_shipped())
                return 0
            out = copy_shipped(args.name, args.dest, force=args.force)
        except (ConfigError, OSError) as exc:
            print(f"rlsync: {args.command}: {exc}", file=sys.stderr)
            return 2
        print(f"rlsync: wrote {out}")
        return 0

    if args.command == "export":
        from rlsync.rl.console import command_console
        from rlsync.rl.export import export_run

        try:
            with command_console():
                export_run(args.run_dir, args.out, step=args.step, force=args.force)
        except ConfigError as exc:
            print(f"rlsync: export: {exc}", file=sys.stderr)
            return 2
        except (CheckpointError, ExportError) as exc:
            print(f"rlsync: export: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        return 0

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
        overrides = args.overrides + (["run.verbose=true"] if args.verbose else [])
        module, config = load_recipe_config(args.config, overrides)
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
