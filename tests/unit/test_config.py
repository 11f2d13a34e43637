"""Configs: strict keys with suggestions, typed values, overrides, shipped configs valid."""

from pathlib import Path

import pytest

from rlsync.cli import load_recipe_config, main
from rlsync.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((ROOT / "configs").rglob("*.yaml"))


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(ROOT)) for p in SHIPPED])
def test_shipped_configs_validate_and_open_with_their_command(path):
    module, config = load_recipe_config(path)
    assert config.recipe in path.read_text()
    first = path.read_text().splitlines()[0]
    assert first.startswith("#"), f"{path} must open with a comment giving its command"
    assert f"rlsync run {path.relative_to(ROOT)}" in path.read_text()
    assert not config.run.overwrite, "a shipped config must never delete a run directory by default"


def test_shipped_configs_exist():
    assert any(p.name == "tiny_cpu_fp8.yaml" and p.parent.name == "grpo" for p in SHIPPED)


@pytest.mark.parametrize("text, overrides, needle", [
    ("recipe: grpo\ngrpo: {lr_rate: 0.1}\n", [], "grpo.lr_rate; did you mean grpo.lr"),
    ("recipe: grpo\ngrpo: {steps: ten}\n", [], "grpo.steps: expected an integer"),
    ("recipe: grpo\ngrpo: {steps: 1.5}\n", [], "grpo.steps: expected an integer"),
    ("recipe: grpo\nengine: {enforce_eager: 1}\n", [], "engine.enforce_eager: expected true/false"),
    ("recipe: grpo\ntask: {name: poetry}\n", [], "task.name: 'poetry' is not a registered task; registered: gsm8k, vowels"),
    ("recipe: grpo\ngrpo: {group_size: 1}\n", [], "grpo.group_size must be >= 2"),
    ("recipe: grpo\nmodel: {dtype: float64}\n", [], "model.dtype"),
    ("recipe: grpo\nengine: {model: /x}\n", [], "engine.model is set from model.path"),
    ("recipe: grpo\n", ["grpo.steps=abc"], "grpo.steps: expected an integer"),
    ("recipe: grpo\n", ["gpro.steps=3"], "unknown config key gpro; did you mean grpo"),
    ("recipe: grpo\n", ["grpo.steps"], "not of the form key=value"),
    ("recipe: nope\n", [], "recipe: 'nope' is not one of"),
    ("recipe: grpo\nengine: {quantization: null, fp8_scheme: block}\n", [], "engine.fp8_scheme / engine.fp8_options"),
    ("recipe: grpo\nengine: {quantization: rlsync_fp8, fp8_scheme: rows}\n", [], "engine.fp8_scheme: 'rows' is not one of"),
    ("recipe: grpo\nengine: {quantization: rlsync_fp8, fp8_options: {blok: [128, 128]}}\n", [], "engine.fp8_options"),
    ("recipe: grpo\nrun: 3\n", [], "run: expected a mapping"),
])
def test_bad_configs_name_the_key(tmp_path, text, overrides, needle):
    with pytest.raises(ConfigError) as info:
        load_recipe_config(write(tmp_path, text), overrides)
    assert needle in str(info.value)


def test_overrides_apply_with_yaml_types(tmp_path):
    path = write(tmp_path, "recipe: grpo\ngrpo: {steps: 3}\n")
    _, cfg = load_recipe_config(path, ["grpo.steps=7", "engine.quantization=null", "grpo.is_cap=null", "run.name=x"])
    assert cfg.grpo.steps == 7 and cfg.engine.quantization is None and cfg.grpo.is_cap is None
    assert cfg.run.name == "x" and isinstance(cfg.grpo.lr, float)


def test_cli_rejects_bad_config_before_any_work(tmp_path, capsys):
    path = write(tmp_path, "recipe: grpo\ngrpo: {stepz: 3}\n")
    assert main(["run", str(path)]) == 2
    assert "grpo.stepz; did you mean grpo.steps" in capsys.readouterr().err
