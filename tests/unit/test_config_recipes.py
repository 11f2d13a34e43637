"""Recipe configs: PPO and GPU configs validate, bad values and impossible combinations name their key,
and configs can only name classes from the allowlist."""

import json
from pathlib import Path

import pytest

from rlsync.cli import load_recipe_config, main
from rlsync.config.allowlist import resolve_allowed
from rlsync.default_model import FAMILIES, family_spec, tiny_model_path
from rlsync.errors import ConfigError
from rlsync.rl.trainer_model import ModelConfig, resolve_model_path

ROOT = Path(__file__).resolve().parents[2]
GPU_CONFIGS = sorted(ROOT.glob("configs/*/gpu_*.yaml"))
# Qwen2.5-0.5B's shape: q/k/v rows 896/128/128, gate/up rows 4864/4864 (all multiples of 128)
QWEN05B = {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 896, "num_attention_heads": 14,
           "num_key_value_heads": 2, "intermediate_size": 4864, "max_position_embeddings": 32768}


def write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def fake_model(tmp_path, **config):
    path = tmp_path / "model"
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps({**QWEN05B, **config}))
    return path


def test_gpu_configs_exist_for_both_recipes_and_fp8_layouts():
    names = {str(p.relative_to(ROOT)) for p in GPU_CONFIGS}
    assert {"configs/grpo/gpu_qwen05b_fp8_tensor.yaml", "configs/grpo/gpu_qwen05b_fp8_block.yaml",
            "configs/ppo/gpu_qwen05b_fp8_block.yaml"} <= names
    assert (ROOT / "configs/ppo/tiny_cpu_fp8.yaml").exists()


@pytest.mark.parametrize("path", GPU_CONFIGS, ids=[p.name for p in GPU_CONFIGS])
def test_gpu_configs_pair_a_hub_model_with_the_math_task_and_validate_against_its_shape(tmp_path, path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))  # not cached: model checks wait
    _, hub = load_recipe_config(path)  # validating a config downloads nothing
    assert hub.model.path == "Qwen/Qwen2.5-0.5B-Instruct" and hub.model.dtype == "bfloat16"
    assert hub.engine.quantization == "rlsync_fp8"
    assert (hub.task.name, hub.task.dataset, hub.task.dataset_config) == ("gsm8k", "openai/gsm8k", "main")
    assert not (tmp_path / "empty-cache").exists()
    _, cfg = load_recipe_config(path, [f"model.path={fake_model(tmp_path)}"])  # now the model checks run
    assert cfg.model.path.endswith("model")


BAD = [
    # (recipe, yaml body, overrides, text the error must contain)
    ("ppo", "ppo: {gama: 0.9}\n", [], "unknown config key ppo.gama; did you mean ppo.gamma"),
    ("ppo", "ppo: {lam: 1.5}\n", [], "ppo.lam must be in [0, 1]"),
    ("ppo", "ppo: {epochs: 0}\n", [], "ppo.epochs must be >= 1"),
    ("ppo", "ppo: {value_trunk: frozen}\n", [], "ppo.value_trunk: 'frozen' is not one of"),
    ("ppo", "ppo: {num_minibatches: 100}\n", [], "ppo.num_minibatches (100) exceeds"),
    ("ppo", "ppo: {is_cap: 0.5}\n", [], "ppo.is_cap must be >= 1"),
    ("ppo", "", ["ppo.value_lr=-1"], "ppo.value_lr must be in (0, 1]"),
    ("ppo", "", ["grpo.steps=3"], "unknown config key grpo; did you mean ppo"),
    ("grpo", "", ["resume=yes please"], "resume: expected true/false"),
    ("grpo", "run: {checkpoint_every: -1}\n", [], "run.checkpoint_every must be >= 0"),
    ("grpo", "run: {name: a/b}\n", [], "run.name must be a plain directory name"),
    ("grpo", "sync: {verify_every: -2}\n", [], "sync.verify_every must be >= 0"),
    ("grpo", "model: {device: tpu}\n", [], "model.device: 'tpu'"),
    ("grpo", "engine: {reload_backend: magic}\n", [], "engine.reload_backend: 'magic' is not one of"),
    ("grpo", "engine: {reload_backend: rlsync, quantization: gptq}\n", [], "engine.reload_backend: reload_backend='rlsync' does not support"),
    ("grpo", "engine: {max_model_len: 16}\n", [], "engine.max_model_len: 16 cannot hold"),
    ("grpo", "engine: {max_model_len: 4096}\n", [], "engine.max_model_len: 4096 exceeds the model's max_position_embeddings (512"),
    ("grpo", "engine: {llm_kwargs: {seed: 3}}\n", [], "engine.llm_kwargs.seed: set engine.seed instead"),
    ("grpo", "model: {builtin: qwen4_moe}\n", [],
     f"model.builtin: 'qwen4_moe' is not a built-in model family; one of {', '.join(FAMILIES)}"),
    ("grpo", "model: {path: /models/x, builtin: qwen3_moe}\n", [],
     "model.builtin: 'qwen3_moe' names a built-in model, but model.path is set (/models/x)"),
    ("grpo", "model: {builtin: mixtral}\nengine: {max_model_len: 4096}\n", [],
     "engine.max_model_len: 4096 exceeds the model's max_position_embeddings (512, built-in tiny mixtral model)"),
    # nothing in a config may make vLLM import or run code (issue 12, item 10)
    ("grpo", "engine: {llm_kwargs: {trust_remote_code: true}}\n", [], "engine.llm_kwargs.trust_remote_code: refused here; it is an explicit option (model.trust_remote_code"),
    ("grpo", "engine: {trust_remote_code: true}\n", [], "engine.trust_remote_code: set model.trust_remote_code instead"),
    ("grpo", "engine: {llm_kwargs: {logits_processors: ['this:Zen']}}\n", [], "engine.llm_kwargs.logits_processors: not an allowed vLLM argument"),
    ("grpo", "engine: {llm_kwargs: {worker_cls: evil.Worker}}\n", [], "engine.llm_kwargs.worker_cls: not an allowed vLLM argument"),
    ("grpo", "engine: {llm_kwargs: {hf_overrides: some.function}}\n", [], "engine.llm_kwargs.hf_overrides: expected a mapping"),
    ("grpo", "engine: {llm_kwargs: {distributed_executor_backend: my.Executor}}\n", [],
     "engine.llm_kwargs.distributed_executor_backend: set by rlsync (vLLM's 'external_launcher' when "
     "engine.tensor_parallel_size > 1)"),
    ("grpo", "engine: {llm_kwargs: {tensor_parallel_size: 2}}\n", [],
     "engine.llm_kwargs.tensor_parallel_size: set engine.tensor_parallel_size instead"),
    ("grpo", "engine: {tensor_parallel_size: 0}\n", [], "engine.tensor_parallel_size must be an int >= 1, got 0"),
    ("grpo", "engine: {quantization: rlsync_fp8, llm_kwargs: {hf_overrides: {quantization_config: {scheme: row}}}}\n",
     [], "engine.llm_kwargs.hf_overrides.quantization_config: rlsync_fp8 scheme 'row'"),
    ("grpo", "engine: {quantization: rlsync_fp8, llm_kwargs: {hf_overrides: {quantization_config: {sceme: block}}}}\n",
     [], "engine.llm_kwargs.hf_overrides.quantization_config: rlsync_fp8: unknown key 'sceme'; did you mean 'scheme'"),
    ("grpo", "model: {path: /nonexistent/model}\n", ["grpo.optimizer=os.system"],
     "grpo.optimizer: 'os.system' is not allowed; a config may only name objects in torch.optim"),
    ("grpo", "", ["grpo.optimizer=torch.optim.lr_scheduler.LambdaLR"], "grpo.optimizer: 'torch.optim.lr_scheduler.LambdaLR' is not allowed"),
    ("grpo", "", ["grpo.optimizer=torch.optim.Optimizer.__init__"], "grpo.optimizer: 'torch.optim.Optimizer.__init__' is not a public dotted name"),
    ("grpo", "", ["grpo.optimizer=torch.optim.NoSuchOpt"], "grpo.optimizer: torch.optim has no 'NoSuchOpt'"),
    ("grpo", "", ["grpo.optimizer=torch.optim.lr_scheduler"], "grpo.optimizer: torch.optim.lr_scheduler is not a torch.optim.Optimizer subclass"),
    ("ppo", "", ["ppo.optimizer=torch.optim.AdamW", "ppo.optimizer_kwargs={betaz: [0.9, 0.9]}"],
     "ppo.optimizer_kwargs.betaz: torch.optim.AdamW takes no argument 'betaz'"),
    ("ppo", "", ["ppo.optimizer_kwargs={lr: 0.1}"], "ppo.optimizer_kwargs.lr: set it with ppo.lr"),
    ("grpo", "", ["grpo.optimizer=torch.optim.Rprop", "grpo.weight_decay=0.1"], "grpo.weight_decay: torch.optim.Rprop has no weight decay"),
]


@pytest.mark.parametrize("recipe, body, overrides, needle", BAD, ids=[b[3][:40] for b in BAD])
def test_bad_recipe_configs_name_the_key(tmp_path, recipe, body, overrides, needle):
    with pytest.raises(ConfigError) as info:
        load_recipe_config(write(tmp_path, f"recipe: {recipe}\n{body}"), overrides)
    assert needle in str(info.value)


def test_blocks_that_straddle_fused_shards_are_accepted(tmp_path):
    """rlsync_fp8 completes a block that straddles two fused shards (gate/up at 4800 = 37.5 x 128 rows, the tiny
    model's q/k/v at 256/128/128 with 96-row blocks), so such configs load."""
    model = fake_model(tmp_path, intermediate_size=4800)
    text = ("recipe: ppo\nengine: {quantization: rlsync_fp8, llm_kwargs: {hf_overrides: {quantization_config: "
            "{scheme: block, block: [128, 128]}}}}\n")
    _, cfg = load_recipe_config(write(tmp_path, text), [f"model.path={model}"])
    assert cfg.engine.fp8().block == (128, 128)
    text = "recipe: grpo\nengine: {quantization: rlsync_fp8, fp8_scheme: block, fp8_options: {block: [96, 128]}}\n"
    assert load_recipe_config(write(tmp_path, text))[1].engine.fp8().block == (96, 128)


def test_a_missing_model_path_fails_at_run_start_naming_the_key(tmp_path, capsys):
    path = write(tmp_path, "recipe: grpo\nmodel: {path: /nonexistent/model}\n")
    load_recipe_config(path)  # validates: a GPU config is checked on a laptop without the model
    assert main(["run", str(path), f"run.output_dir={tmp_path}"]) == 2
    assert "model.path: /nonexistent/model is not a Hugging Face checkpoint directory" in capsys.readouterr().err
    assert not (tmp_path / "grpo-tiny").exists()  # failed before creating the run directory


def test_allowlist_accepts_only_named_modules_and_kinds():
    import torch

    assert resolve_allowed("torch.optim.SGD", key="k", modules=("torch.optim",)) is torch.optim.SGD
    for bad in ("builtins.eval", "subprocess.Popen", "torch.optim", "torch.optim.SGD.step", "torch.optim._adam"):
        with pytest.raises(ConfigError, match="^k: "):
            resolve_allowed(bad, key="k", modules=("torch.optim",))
    with pytest.raises(ConfigError, match="is not a Optimizer class"):
        resolve_allowed("torch.optim.Optimizer", key="k", modules=("torch.optim",), check=lambda o: False,
                        kind="Optimizer class")


def test_optimizer_kwargs_reach_the_optimizer(tmp_path):
    import torch

    from rlsync.rl.optim import build_optimizer

    _, cfg = load_recipe_config(write(tmp_path, "recipe: ppo\nppo: {optimizer: torch.optim.Adam, "
                                                "optimizer_kwargs: {betas: [0.8, 0.9]}}\n"))
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(2))], cfg.ppo.optimizer, lr=cfg.ppo.lr,
                          weight_decay=cfg.ppo.weight_decay, kwargs=cfg.ppo.optimizer_kwargs, section="ppo")
    assert type(opt) is torch.optim.Adam and opt.defaults["betas"] == (0.8, 0.9) and opt.defaults["lr"] == cfg.ppo.lr


def test_model_builtin_picks_the_built_in_family():
    """`model.builtin` chooses the tiny model built when `model.path` is null; qwen2 (the default) is the tiny
    model every recipe used before the key existed, and the MoE configs pick Qwen3-MoE."""
    assert resolve_model_path(ModelConfig()) == str(tiny_model_path())
    for name in ("grpo/tiny_cpu_moe_fp8.yaml", "grpo/tiny_cpu_moe_fsdp2.yaml"):
        _, cfg = load_recipe_config(ROOT / "configs" / name)
        assert cfg.model.path is None and cfg.model.builtin == "qwen3_moe"
        assert cfg.engine.quantization == "rlsync_fp8"
    assert cfg.trainer.backend == "fsdp2"
    assert resolve_model_path(cfg.model) == str(tiny_model_path(family_spec("qwen3_moe")))
    _, cfg = load_recipe_config(ROOT / "configs/grpo/tiny_cpu_moe_fp8.yaml", ["model.builtin=mixtral"])
    assert resolve_model_path(cfg.model) == str(tiny_model_path(family_spec("mixtral")))
    # a path with the default family is the usual case: no error
    _, cfg = load_recipe_config(ROOT / "configs/grpo/tiny_cpu_fp8.yaml", ["model.path=/models/x"])
    assert cfg.model.builtin == "qwen2"


def test_a_run_saved_before_model_builtin_existed_resumes(tmp_path):
    """A run directory whose config.yaml has no model.builtin (written before the key existed) resumes with the
    default family, which is what it ran; another family is a different experiment and is refused."""
    import yaml

    from rlsync.rl.run import RunDir

    _, cfg = load_recipe_config(ROOT / "configs/grpo/tiny_cpu_fp8.yaml", [f"run.output_dir={tmp_path}"])
    RunDir(cfg.run, cfg).close()
    saved = tmp_path / cfg.run.name / "config.yaml"
    old = yaml.safe_load(saved.read_text())
    del old["model"]["builtin"]
    saved.write_text(yaml.safe_dump(old, sort_keys=False))
    RunDir(cfg.run, cfg, resume=True).close()
    saved.write_text(yaml.safe_dump(old, sort_keys=False))
    _, moe = load_recipe_config(ROOT / "configs/grpo/tiny_cpu_fp8.yaml",
                                [f"run.output_dir={tmp_path}", "model.builtin=qwen3_moe"])
    with pytest.raises(ConfigError, match=r"model\.builtin: None -> 'qwen3_moe'"):
        RunDir(moe.run, moe, resume=True)
