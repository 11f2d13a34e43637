"""Every bad config a user can hand rlsync is a ConfigError naming the key or file, before anything is written.

One table: non-finite and absurd hyperparameters, malformed YAML and Python tags, an abstract optimizer,
ill-typed optimizer arguments, run names that are not one plain directory name, unregistered tasks and
rewards, a model directory without weights, a hub id neither cached nor downloadable (offline), and a run
directory rlsync did not create. Each case runs the CLI's own path (load the config,
then the recipe's `main`, which does the checks that need the disk) and then checks the output directory
is exactly as it was.
"""

import json
from pathlib import Path

import pytest

from rlsync.cli import load_recipe_config
from rlsync.errors import ConfigError

# Qwen2.5-0.5B's shape, as in test_config_recipes.py: a model config that passes the shape checks.
QWEN05B = {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 896, "num_attention_heads": 14,
           "num_key_value_heads": 2, "intermediate_size": 4864, "max_position_embeddings": 32768}

CASES = [
    # (id, recipe, yaml body, overrides, text the message must contain; {cfg}, {out}, {model} are filled in)
    # -- non-finite and absurd hyperparameters
    ("grpo-lr-nan", "grpo", "", ["grpo.lr=.nan"], "grpo.lr: expected a finite number, got nan"),
    ("grpo-lr-inf", "grpo", "", ["grpo.lr=.inf"], "grpo.lr: expected a finite number, got inf"),
    ("grpo-lr-minus-inf", "grpo", "grpo: {lr: -.inf}\n", [], "grpo.lr: expected a finite number"),
    ("grpo-lr-1e30", "grpo", "", ["grpo.lr=1.0e+30"], "grpo.lr must be in (0, 1], got 1e+30"),
    ("grpo-lr-zero", "grpo", "", ["grpo.lr=0"], "grpo.lr must be in (0, 1]"),
    ("grpo-clip-nan", "grpo", "", ["grpo.clip_ratio=.nan"], "grpo.clip_ratio: expected a finite number"),
    ("grpo-clip-5", "grpo", "", ["grpo.clip_ratio=5"], "grpo.clip_ratio must be in (0, 1]"),
    ("grpo-kl-inf", "grpo", "", ["grpo.kl_coef=.inf"], "grpo.kl_coef: expected a finite number"),
    ("grpo-kl-1e9", "grpo", "", ["grpo.kl_coef=1.0e+9"], "grpo.kl_coef must be in [0, 10]"),
    ("grpo-temperature-nan", "grpo", "", ["grpo.temperature=.nan"], "grpo.temperature: expected a finite number"),
    ("grpo-temperature-1e6", "grpo", "", ["grpo.temperature=1.0e+6"], "grpo.temperature must be in (0, 10]"),
    ("grpo-grad-norm-inf", "grpo", "", ["grpo.max_grad_norm=.inf"], "grpo.max_grad_norm: expected a finite number"),
    ("grpo-is-cap-nan", "grpo", "", ["grpo.is_cap=.nan"], "grpo.is_cap: expected a finite number"),
    ("grpo-weight-decay-2", "grpo", "", ["grpo.weight_decay=2"], "grpo.weight_decay must be in [0, 1]"),
    ("ppo-value-lr-inf", "ppo", "", ["ppo.value_lr=.inf"], "ppo.value_lr: expected a finite number"),
    ("ppo-value-clip-inf", "ppo", "", ["ppo.value_clip=.inf"], "ppo.value_clip: expected a finite number"),
    ("ppo-vf-coef-nan", "ppo", "", ["ppo.vf_coef=.nan"], "ppo.vf_coef: expected a finite number"),
    ("ppo-gamma-nan", "ppo", "", ["ppo.gamma=.nan"], "ppo.gamma: expected a finite number"),
    ("ppo-clip-2", "ppo", "", ["ppo.clip_ratio=2"], "ppo.clip_ratio must be in (0, 1]"),
    ("ppo-lr-1e30", "ppo", "", ["ppo.lr=1.0e+30"], "ppo.lr must be in (0, 1]"),
    ("trl-lr-nan", "trl_grpo", "", ["trl.learning_rate=.nan"], "trl.learning_rate: expected a finite number"),
    ("trl-lr-100", "trl_grpo", "", ["trl.learning_rate=100"], "trl.learning_rate must be in (0, 1]"),
    ("trl-beta-inf", "trl_grpo", "", ["trl.beta=.inf"], "trl.beta: expected a finite number"),
    ("trainer-timeout-inf", "grpo", "", ["trainer.timeout_s=.inf"], "trainer.timeout_s: expected a finite number"),
    # -- YAML that is not plain, well-formed data
    ("yaml-unclosed-flow", "grpo", "grpo: {lr: 0.1\nrun: {}\n", [], "{cfg}, line 3, column 4: invalid YAML: expected ',' or '}'"),
    ("yaml-bad-indent", "grpo", "grpo:\n  lr: 0.1\n bad: 1\n", [], "{cfg}, line 4, column 2: invalid YAML"),
    ("yaml-python-tag", "grpo", "grpo:\n  lr: !!python/object/apply:os.system ['mkdir {out}']\n", [],
     "{cfg}, line 3, column 7: could not determine a constructor for the tag "
     "'tag:yaml.org,2002:python/object/apply:os.system'"),
    ("yaml-python-name", "grpo", "run: !!python/name:os.system\n", [], "{cfg}, line 2, column 6: could not determine"),
    ("override-python-tag", "grpo", "", ["grpo.lr=!!python/object/apply:os.system [x]"], "override grpo.lr: cannot parse"),
    # -- optimizer: concrete classes only, arguments checked against the signature
    ("abstract-optimizer", "grpo", "", ["grpo.optimizer=torch.optim.Optimizer"],
     "grpo.optimizer: torch.optim.Optimizer is an abstract base class"),
    ("betas-string", "grpo", "", ["grpo.optimizer_kwargs={betas: [0.9, x]}"],
     "grpo.optimizer_kwargs.betas: torch.optim.AdamW expects a list of 2: [a finite number, a finite number]"),
    ("betas-scalar", "grpo", "", ["grpo.optimizer_kwargs={betas: 0.9}"], "grpo.optimizer_kwargs.betas: "),
    ("betas-one", "ppo", "", ["ppo.optimizer_kwargs={betas: [0.9]}"], "ppo.optimizer_kwargs.betas: "),
    ("betas-nan", "grpo", "", ["grpo.optimizer_kwargs={betas: [.nan, 0.9]}"], "grpo.optimizer_kwargs.betas: "),
    ("betas-out-of-range", "grpo", "", ["grpo.optimizer_kwargs={betas: [1.5, 0.9]}"],
     "grpo.optimizer_kwargs: torch.optim.AdamW refuses {'betas': [1.5, 0.9]}: Invalid beta parameter"),
    ("eps-inf", "grpo", "", ["grpo.optimizer_kwargs={eps: .inf}"],
     "grpo.optimizer_kwargs.eps: torch.optim.AdamW expects a finite number, got inf"),
    ("amsgrad-int", "grpo", "", ["grpo.optimizer_kwargs={amsgrad: 1}"],
     "grpo.optimizer_kwargs.amsgrad: torch.optim.AdamW expects true/false, got 1"),
    ("momentum-string", "ppo", "", ["ppo.optimizer=torch.optim.SGD", "ppo.optimizer_kwargs={momentum: fast}"],
     "ppo.optimizer_kwargs.momentum: torch.optim.SGD expects a finite number, got 'fast'"),
    # -- run names: one plain directory name
    ("name-nul", "grpo", 'run: {name: "a\\0b"}\n', [], "run.name must be a plain directory name, got 'a\\x00b'"),
    ("name-newline", "grpo", 'run: {name: "a\\nb"}\n', [], "run.name must be a plain directory name"),
    ("name-slash", "grpo", "", ["run.name=a/b"], "run.name must be a plain directory name, got 'a/b'"),
    ("name-backslash", "grpo", "", ["run.name=a\\b"], "run.name must be a plain directory name"),
    ("name-dotdot", "grpo", "", ["run.name=.."], "run.name must be a plain directory name, got '..'"),
    ("name-dotdot-inside", "grpo", "", ["run.name=x..y"], "run.name must be a plain directory name"),
    ("name-300", "grpo", "", ["run.name=" + "x" * 300], "it is 300 bytes long (at most 255)"),
    ("output-dir-nul", "grpo", "", ['run.output_dir="a\\0b"'], "run.output_dir must be a path without control"),
    # -- tasks and rewards: registered names only
    ("task-unknown", "grpo", "task: {name: poetry}\n", [], "task.name: 'poetry' is not a registered task; registered: "),
    ("trl-task-unknown", "trl_grpo", "", ["task.name=gsm9k"], "task.name: 'gsm9k' is not a registered task (did you "),
    ("reward-unknown", "ppo", "", ["task.rewards=[vowels, os.system]"], "task.rewards: 'os.system' is not a registered"),
    ("dataset-for-vowels", "grpo", "", ["task.dataset=openai/gsm8k"], "task.dataset: the vowels task generates"),
    # -- checked at run start, before the run directory is written
    ("model-without-weights", "grpo", "", ["model.path={model}"],
     "model.path: {model} holds config.json but no weights (no *.safetensors file)"),
    ("ppo-model-without-weights", "ppo", "", ["model.path={model}"], "model.path: {model} holds config.json"),
    ("hub-id-offline-not-cached", "grpo", "", ["model.path=rlsync-test/not-cached"],
     "model.path: rlsync-test/not-cached is not a local directory, and as a hub id it is not in the Hugging Face "
     "cache ({out}/../hub); HF_HUB_OFFLINE=1 forbids downloading it"),
    ("overwrite-foreign-dir", "grpo", "", ["run.name=theirs", "run.overwrite=true"],
     "run.overwrite: {out}/theirs exists and was not created by rlsync (no .rlsync-run file in it)"),
    ("reuse-foreign-dir", "ppo", "", ["run.name=theirs"], "run.name: {out}/theirs exists and was not created by rlsync"),
    ("resume-foreign-dir", "grpo", "", ["run.name=theirs", "resume=true"], "run.name: {out}/theirs exists and was not"),
]


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` with its bytes (None for directories); {} if `root` does not exist."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def accepted(*args, **kwargs):
    raise AssertionError("the config was accepted: the recipe went on to load the model")


@pytest.mark.parametrize("recipe, body, overrides, needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_config_is_refused_naming_the_key_and_writes_nothing(tmp_path, monkeypatch, recipe, body, overrides,
                                                                 needle):
    out = tmp_path / "out"
    foreign = out / "theirs" / "checkpoints"  # a directory rlsync did not create, holding someone's files
    foreign.mkdir(parents=True)
    (foreign / "model.pt").write_bytes(b"someone else's checkpoint")
    model = tmp_path / "model"  # config.json but no *.safetensors
    model.mkdir()
    (model / "config.json").write_text(json.dumps(QWEN05B))
    cfg = tmp_path / "c.yaml"

    def fill(text: str) -> str:
        return text.replace("{cfg}", str(cfg)).replace("{out}", str(out)).replace("{model}", str(model))

    cfg.write_text(f"recipe: {recipe}\n{fill(body)}")
    before = snapshot(out)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(out / ".." / "hub"))  # an empty cache, offline: no case
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)                 # may reach the hub

    with pytest.raises(ConfigError) as info:
        module, config = load_recipe_config(cfg, [f"run.output_dir={out}", "run.progress=false",
                                                  *map(fill, overrides)])
        monkeypatch.setattr(module, "load_trainer_model", accepted)  # a case that slips through fails fast
        module.main(config)  # the checks that need the disk: model weights, run directory ownership

    assert fill(needle) in str(info.value)
    assert snapshot(out) == before, "a refused config wrote to the output directory"
    assert not (tmp_path / "model" / "model.safetensors").exists()
