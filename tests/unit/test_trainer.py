"""The `trainer:` section: bad settings fail at load naming the key, launch checks, DeepSpeed config, LoRA."""

import pytest
import torch

from rlsync.cli import load_recipe_config
from rlsync.errors import ConfigError
from rlsync.trainer import TrainerConfig, apply_lora, deepspeed_config, setup_distributed, wrap
from rlsync.trainer.config import LoraOptions

LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.mark.parametrize("recipe", ["grpo", "ppo"])
@pytest.mark.parametrize("body, overrides, needle", [
    ("trainer: {backend: fsdp3}\n", [], "trainer.backend: 'fsdp3' is not one of"),
    ("trainer: {backend: zero3}\nrun: {checkpoint_every: 5}\n", [], "run.checkpoint_every: trainer.backend=zero3"),
    ("trainer: {backend: zero2}\n", ["resume=true"], "resume: trainer.backend=zero2 runs cannot be resumed"),
    ("trainer: {backend: fsdp2, deepspeed: {bf16: {enabled: true}}}\n", [], "trainer.deepspeed is only used"),
    ("trainer: {backend: zero3, deepspeed: {zero_optimization: {stage: 2}}}\n", [],
     "trainer.deepspeed.zero_optimization.stage is set by rlsync"),
    ("trainer: {backend: zero3, deepspeed: {gradient_clipping: 2.0}}\n", [], "trainer.deepspeed.gradient_clipping"),
    ("trainer: {lora: {r: -1}}\n", [], "trainer.lora.r must be >= 0"),
    ("trainer: {lora: {r: 4, target_modules: []}}\n", [], "trainer.lora.target_modules"),
    ("trainer: {timeout_s: 0}\n", [], "trainer.timeout_s must be > 0"),
    ("trainer: {bucket_bytes: 0}\n", [], "trainer.bucket_bytes must be > 0"),
    ("trainer: {backnd: ddp}\n", [], "trainer.backnd; did you mean trainer.backend"),
])
def test_bad_trainer_configs_name_the_key(tmp_path, recipe, body, overrides, needle):
    path = tmp_path / "c.yaml"
    path.write_text(f"recipe: {recipe}\n" + body)
    with pytest.raises(ConfigError) as info:
        load_recipe_config(path, overrides)
    assert needle in str(info.value)


def test_zero3_config_with_its_defaults_loads(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("recipe: grpo\nrun: {checkpoint_every: 0}\ntrainer: {backend: zero3, deepspeed: "
                    "{zero_optimization: {stage3_param_persistence_threshold: 0}}}\n")
    _, cfg = load_recipe_config(path)
    ds = deepspeed_config(cfg.trainer, max_grad_norm=cfg.grpo.max_grad_norm)
    assert ds["zero_optimization"] == {"stage": 3, "stage3_param_persistence_threshold": 0}  # merged, not replaced
    assert ds["gradient_clipping"] == cfg.grpo.max_grad_norm and ds["gradient_accumulation_steps"] == 1


def test_a_distributed_backend_without_a_launcher_names_the_launcher(monkeypatch):
    for key in LAUNCH_ENV:
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(ConfigError, match=r"trainer.backend: fsdp2 needs a launcher \(torchrun"):
        setup_distributed(TrainerConfig(backend="fsdp2"))
    with pytest.raises(ConfigError, match=r"trainer.backend: zero3 needs a launcher \(deepspeed"):
        setup_distributed(TrainerConfig(backend="zero3"))
    assert setup_distributed(TrainerConfig()) == 1


def test_single_backend_under_a_multi_rank_launcher_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="trainer.backend: single, but this process was launched as one of 2"):
        setup_distributed(TrainerConfig())


def _tiny():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    return Qwen2ForCausalLM(config).float()


def test_lora_trains_only_adapters_and_single_wrap_keeps_the_model():
    model = _tiny()
    assert apply_lora(model, LoraOptions()) is model  # r = 0: full fine-tuning
    trainer = wrap(model, TrainerConfig(lora=LoraOptions(r=2, target_modules=["q_proj", "v_proj"])),
                   lambda ps: torch.optim.SGD(ps, lr=0.1), max_grad_norm=1.0)
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    assert sum(len(g["params"]) for g in trainer.optimizer.param_groups) == len(trainable)
    ids = torch.randint(0, 16, (2, 8))
    trainer.stepper.zero_grad()
    trainer.stepper.backward(trainer.model(input_ids=ids, labels=ids).loss)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    norm = trainer.stepper.step()
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    assert norm > 0 and changed and all("lora_B" in n for n in changed)  # B starts at 0, so only B moves first
