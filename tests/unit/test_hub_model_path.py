"""`model.path` as a Hugging Face hub id: resolved to the local snapshot through `huggingface_hub` (the cache
first, a download only when missing, never with HF_HUB_OFFLINE=1), and that directory is what the trainer, the
config checks and the engine get. Tested against a cache built here (nothing is downloaded)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rlsync.cli import load_recipe_config, main
from rlsync.default_model import tiny_model_path
from rlsync.errors import ConfigError
from rlsync.rl.trainer_model import ModelConfig, is_hub_id, load_trainer_model, require_model_path, resolve_model_path

REPO = Path(__file__).resolve().parents[2]
REPO_ID = "rlsync-test/tiny-qwen2"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def build_cache(hub: Path) -> Path:
    """A Hugging Face hub cache holding the built-in tiny model as REPO_ID at `main` (huggingface_hub's layout:
    models--org--name/refs/main -> commit, snapshots/<commit>/files); returns the snapshot directory."""
    repo = hub / f"models--{REPO_ID.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    shutil.copytree(tiny_model_path(), snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """huggingface_hub pointed at a cache under tmp_path, offline (its constants are read at import, as
    HF_HUB_CACHE / HF_HOME / HF_HUB_OFFLINE are in a fresh process: the subprocess test checks that path)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return tmp_path / "hub"


def test_hub_ids_are_org_slash_name_that_is_not_a_local_path(tmp_path, monkeypatch):
    assert is_hub_id("Qwen/Qwen2.5-0.5B-Instruct") and is_hub_id("org/name")
    for local in ("/models/x", "./org/name", "gpt2", "a/b/c", "../x", "~/models"):
        assert not is_hub_id(local), local
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert not is_hub_id("org/name")  # a directory that exists is always local


def test_a_cached_hub_id_resolves_offline_to_its_snapshot_for_the_trainer_and_the_engine(offline_hub):
    snapshot = build_cache(offline_hub)
    config = ModelConfig(path=REPO_ID)
    assert resolve_model_path(config) == str(snapshot)
    require_model_path(config)
    model, path, tokenizer = load_trainer_model(config)
    assert path == str(snapshot)  # the recipes hand this path to VLLMEngine
    assert model.config.vocab_size == len(tokenizer) and model.config.hidden_size == 256
    # the config checks read the cached config.json: the tiny model's 512 positions
    with pytest.raises(ConfigError, match=r"engine.max_model_len: 4096 exceeds the model's max_position_embeddings "
                                          r"\(512, rlsync-test/tiny-qwen2\)"):
        load_recipe_config(REPO / "configs/grpo/tiny_cpu_fp8.yaml", [f"model.path={REPO_ID}", "engine.max_model_len=4096"])


def test_an_uncached_hub_id_offline_is_a_clear_error_before_anything_is_written(offline_hub, tmp_path, capsys):
    build_cache(offline_hub)
    config = ModelConfig(path="rlsync-test/not-cached")
    load_recipe_config(REPO / "configs/grpo/tiny_cpu_fp8.yaml", [f"model.path={config.path}"])  # validates: no model yet
    with pytest.raises(ConfigError, match=r"model.path: rlsync-test/not-cached is not a local directory, and as a hub "
                                          r"id it is not in the Hugging Face cache \(.*hub\); HF_HUB_OFFLINE=1 forbids "
                                          r"downloading it"):
        resolve_model_path(config)
    out = tmp_path / "runs"
    assert main(["run", "configs/grpo/tiny_cpu_fp8.yaml", f"model.path={config.path}", f"run.output_dir={out}"]) == 2
    assert "HF_HUB_OFFLINE=1 forbids downloading it" in capsys.readouterr().err
    assert not out.exists()


def test_online_the_cache_comes_first_and_only_a_missing_model_is_downloaded(offline_hub, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    snapshot = build_cache(offline_hub)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    real, calls = huggingface_hub.snapshot_download, []

    def no_network(repo_id, **kwargs):
        calls.append((repo_id, kwargs.get("local_files_only", False), tuple(kwargs["allow_patterns"])))
        if kwargs.get("local_files_only"):
            return real(repo_id, **kwargs)
        if repo_id == "rlsync-test/missing":
            return str(snapshot)  # what a download would return
        raise LocalEntryNotFoundError("hub unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    assert resolve_model_path(ModelConfig(path=REPO_ID)) == str(snapshot)
    assert [c[:2] for c in calls] == [(REPO_ID, True)]  # cached: the hub is not asked
    calls.clear()
    assert resolve_model_path(ModelConfig(path="rlsync-test/missing")) == str(snapshot)
    assert [c[:2] for c in calls] == [("rlsync-test/missing", True), ("rlsync-test/missing", False)]
    assert "*.safetensors" in calls[1][2] and not any("bin" in p or p == "*.py" for p in calls[1][2])
    with pytest.raises(ConfigError, match="model.path: rlsync-test/gone is not a local directory, not in the Hugging "
                                          "Face cache .* downloading it from the hub failed: LocalEntryNotFoundError"):
        resolve_model_path(ModelConfig(path="rlsync-test/gone"))


def test_a_fresh_process_honours_hf_home_and_hf_hub_offline(tmp_path):
    snapshot = build_cache(tmp_path / "home" / "hub")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    code = ("from rlsync.rl.trainer_model import ModelConfig, require_model_path, resolve_model_path\n"
            f"config = ModelConfig(path={REPO_ID!r}); require_model_path(config); print(resolve_model_path(config))\n"
            "try:\n    resolve_model_path(ModelConfig(path='rlsync-test/absent'))\n"
            "except ValueError as exc:\n    print(exc)\n")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[0] == str(snapshot)
    assert f"not in the Hugging Face cache ({tmp_path / 'home' / 'hub'}); HF_HUB_OFFLINE=1 forbids" in lines[1]
