"""Discovery from the command line: `rlsync --version`, `rlsync ls`, `rlsync cp`, and configs run by name."""

import importlib.metadata
from pathlib import Path

import pytest

from rlsync.cli import RECIPES, load_recipe_config, main
from rlsync.config.shipped import config_name, configs_dir, resolve_config, shipped_config, shipped_configs
from rlsync.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
ON_DISK = sorted((REPO / "configs").rglob("*.yaml"))
TINY = REPO / "configs/grpo/tiny_cpu_fp8.yaml"


def test_version_prints_the_installed_distribution_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"rlsync {importlib.metadata.version('rlsync')}\n"


def test_the_shipped_configs_are_the_repositorys_configs_by_name():
    assert configs_dir() == REPO / "configs"
    names = {p.relative_to(REPO / "configs").with_suffix("").as_posix(): p for p in ON_DISK}
    assert shipped_configs() == names
    assert "grpo/tiny_cpu_fp8" in names


def test_ls_lists_every_config_with_its_recipe_and_every_recipe(capsys):
    assert main(["ls"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines() if line.startswith("  ")}
    for path in ON_DISK:
        name = path.relative_to(REPO / "configs").with_suffix("").as_posix()
        recipe = next(line.split(":", 1)[1].strip() for line in path.read_text().splitlines()
                      if line.startswith("recipe:"))
        assert rows[name] == recipe, name
    for recipe, (module, _) in RECIPES.items():
        assert rows[recipe] == module
    assert "GRPO on the built-in tiny Qwen2 model" in out  # a config's first header line


@pytest.mark.parametrize("text", ["grpo/tiny_cpu_fp8", "grpo/tiny_cpu_fp8.yaml", "configs/grpo/tiny_cpu_fp8.yaml",
                                  "./configs/grpo/tiny_cpu_fp8.yaml"])
def test_a_shipped_config_resolves_by_name_from_any_directory(text, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside the checkout: no file of that name here
    assert config_name(text) == "grpo/tiny_cpu_fp8"
    assert resolve_config(text) == TINY
    module, config = load_recipe_config(text, ["grpo.steps=3"])
    assert module.__name__ == RECIPES["grpo"][0]
    _, by_path = load_recipe_config(TINY, ["grpo.steps=3"])
    assert config == by_path and config.grpo.steps == 3


def test_a_file_that_exists_wins_over_a_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    local = tmp_path / "grpo" / "tiny_cpu_fp8.yaml"
    local.parent.mkdir()
    local.write_text("recipe: grpo\ngrpo: {steps: 7}\n")
    assert resolve_config("grpo/tiny_cpu_fp8.yaml") == Path("grpo/tiny_cpu_fp8.yaml")
    _, config = load_recipe_config("grpo/tiny_cpu_fp8.yaml")
    assert config.grpo.steps == 7


def test_an_unknown_name_fails_with_close_matches(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="close matches: .*grpo/tiny_cpu_fp8"):
        shipped_config("grpo/tiny_cpu_fp9")
    with pytest.raises(ConfigError, match="grpo/tiny_cpu_fsdp2"):
        shipped_config("fsdp2")
    assert main(["run", "grpo/tiny_cpu_fp9"]) == 2
    err = capsys.readouterr().err
    assert "config file not found: grpo/tiny_cpu_fp9" in err and "grpo/tiny_cpu_fp8" in err
    assert "rlsync ls" in err


def test_cp_copies_a_shipped_config_byte_for_byte(tmp_path, capsys):
    dest = tmp_path / "mine.yaml"
    assert main(["cp", "grpo/tiny_cpu_fp8", str(dest)]) == 0
    assert dest.read_bytes() == TINY.read_bytes()
    assert str(dest) in capsys.readouterr().out
    _, config = load_recipe_config(dest)  # the copy runs as a config of its own
    assert config.recipe == "grpo"


def test_cp_into_a_directory_keeps_the_file_name(tmp_path):
    assert main(["cp", "configs/ppo/tiny_cpu_fp8.yaml", str(tmp_path)]) == 0
    assert (tmp_path / "tiny_cpu_fp8.yaml").read_bytes() == (REPO / "configs/ppo/tiny_cpu_fp8.yaml").read_bytes()


def test_cp_never_overwrites_without_force(tmp_path, capsys):
    dest = tmp_path / "mine.yaml"
    dest.write_text("my edits\n")
    assert main(["cp", "grpo/tiny_cpu_fp8", str(dest)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert dest.read_text() == "my edits\n"
    assert main(["cp", "grpo/tiny_cpu_fp8", str(dest), "--force"]) == 0
    assert dest.read_bytes() == TINY.read_bytes()


@pytest.mark.parametrize("name, dest, needle", [
    ("grpo/no_such", "x.yaml", "close matches"),
    ("grpo/tiny_cpu_fp8", "missing_dir/", "directory missing_dir does not exist"),
    ("grpo/tiny_cpu_fp8", "missing_dir/x.yaml", "directory missing_dir does not exist"),
])
def test_cp_refusals_write_nothing(name, dest, needle, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["cp", name, dest]) == 2
    assert needle in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
