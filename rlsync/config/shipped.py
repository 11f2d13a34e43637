"""The configs rlsync ships, found by name (`grpo/tiny_cpu_fp8`) in a checkout or an installed wheel.

Why this module: `rlsync run NAME`, `rlsync ls` and `rlsync cp NAME DEST` resolve the same
names, and `pip install rlsync` must find the configs without the repository. The
repository keeps `configs/` at its top, next to `recipes/`; the wheel carries both inside
the `rlsync` package (`rlsync/configs/`, `rlsync/recipes/`: the `package-dir` mapping in
pyproject.toml), so the configs are in one of two places:

1. `<rlsync package>/configs`: an installed wheel;
2. `<rlsync package>/../configs`: a source checkout (the editable install that
   scripts/setup.sh makes), recognised by the checkout's `pyproject.toml` and `recipes/`
   next to it, so a stray `configs` directory in site-packages is never taken.

A config's name is its path under that directory without `.yaml`. `configs/` in front and
the `.yaml` suffix are accepted too, so the README's `configs/grpo/tiny_cpu_fp8.yaml`
resolves outside a checkout.

Limitations:
1. Only `*.yaml` files are configs (`.yml` is not looked for).
2. A file on disk always wins over a shipped name of the same spelling (`resolve_config`).
"""

from __future__ import annotations

import difflib
from pathlib import Path

from rlsync.config.loader import read_yaml
from rlsync.errors import ConfigError

_PACKAGE = Path(__file__).resolve().parents[1]  # the `rlsync` package directory
SUFFIX = ".yaml"


def configs_dir() -> Path:
    """The directory holding the shipped configs (wheel first, then source checkout)."""
    installed = _PACKAGE / "configs"
    if installed.is_dir():
        return installed
    checkout = _PACKAGE.parent
    if (checkout / "configs").is_dir() and (checkout / "pyproject.toml").is_file() and (checkout / "recipes").is_dir():
        return checkout / "configs"
    raise ConfigError(f"no shipped configs found (looked in {installed} and {checkout / 'configs'}); "
                      "reinstall rlsync")


def shipped_configs() -> dict[str, Path]:
    """Every shipped config, name -> path, sorted by name."""
    root = configs_dir()
    paths = sorted(root.rglob(f"*{SUFFIX}"))
    return {path.relative_to(root).with_suffix("").as_posix(): path for path in paths}


def config_name(text: str) -> str:
    """The shipped-config name `text` spells: `configs/grpo/x.yaml` and `grpo/x` both give `grpo/x`."""
    name = Path(text).as_posix().removeprefix("./").removeprefix("configs/")
    return name.removesuffix(SUFFIX)


def close_matches(name: str, names: list[str], n: int = 5) -> list[str]:
    """Names that contain `name`'s last part, then names that are spelled alike (at most `n`)."""
    leaf = name.rpartition("/")[2]
    containing = [other for other in names if leaf and leaf in other]
    alike = difflib.get_close_matches(name, names, n=n, cutoff=0.5)
    return list(dict.fromkeys(containing + alike))[:n]


def shipped_config(text: str) -> Path:
    """The path of the shipped config `text` names; a `ConfigError` with close matches if none."""
    configs = shipped_configs()
    name = config_name(text)
    if name in configs:
        return configs[name]
    matches = close_matches(name, list(configs))
    hint = f"; close matches: {', '.join(matches)}" if matches else ""
    raise ConfigError(f"no shipped config named {name!r}{hint} (`rlsync ls` lists them all)")


def resolve_config(text: str | Path) -> Path:
    """A config file: `text` itself when that file exists, else the shipped config of that name."""
    path = Path(text)
    if path.is_file():
        return path
    if path.is_absolute():
        raise ConfigError(f"config file not found: {path}")
    try:
        return shipped_config(str(text))
    except ConfigError as exc:
        raise ConfigError(f"config file not found: {path}, and {exc}") from None


def describe(path: Path) -> tuple[str, str]:
    """(recipe, summary) of a config: its `recipe:` key and the first line of its header comment."""
    text = path.read_text(encoding="utf-8")
    first = text.splitlines()[0] if text else ""
    summary = first.lstrip("#").strip() if first.startswith("#") else ""
    raw = read_yaml(path)
    recipe = raw.get("recipe") if isinstance(raw, dict) else None
    return str(recipe or "?"), summary
