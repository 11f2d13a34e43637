"""The distribution's layout: every rlsync package is built; recipes/ and configs/ ride inside `rlsync`.

The repository keeps `recipes/` and `configs/` at its top; pyproject.toml maps them to
`rlsync.recipes` and `rlsync/configs/` (package data), so `pip install rlsync` gets every
shipped config and claims no top-level `recipes` import name. The package list is explicit
(`package-dir` renames), so the first test keeps it in step with the directories.

Limitation: the wheel itself is not built here (too slow for the unit tier); the editable
install that scripts/setup.sh makes is checked instead, through the same mapping.
"""

import importlib.metadata
import importlib.util
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def setuptools_table() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]


def test_every_package_under_rlsync_is_built_and_recipes_and_configs_are_mapped_into_it():
    table = setuptools_table()
    on_disk = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "rlsync").rglob("__init__.py")}
    assert set(table["packages"]) == on_disk | {"rlsync.recipes", "rlsync.configs"}
    assert table["package-dir"] == {"rlsync.recipes": "recipes", "rlsync.configs": "configs"}
    assert table["package-data"] == {"rlsync.configs": ["**/*.yaml"], "rlsync": ["data/*.jsonl"]}
    assert not any(name == "recipes" or name.startswith("recipes.") for name in table["packages"])


def test_the_installed_distribution_claims_only_the_rlsync_import_name():
    top_level = importlib.metadata.distribution("rlsync").read_text("top_level.txt")
    assert top_level is not None and top_level.split() == ["rlsync"], (
        f"installed top-level names {top_level!r}: the install predates pyproject.toml; run scripts/setup.sh")
    spec = importlib.util.find_spec("rlsync.recipes.grpo")
    assert spec is not None and Path(spec.origin) == REPO / "recipes" / "grpo.py"
