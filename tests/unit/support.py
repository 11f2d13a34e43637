"""Hand-built toy layers shaped like vLLM's (fused shards, kernel-format processing, a tied head),
shared by the reload tests in tests/unit. No vLLM import: the reload core runs on plain torch modules.
Also: a run directory with checkpoints of a changed policy, for the export tests (`trained_run`).

The toy quant method does what vLLM's online FP8 does structurally: it replaces
`weight` by a transposed, quantized tensor and creates `weight_scale`.
"""

import re
import weakref
from pathlib import Path

import torch
from torch import nn

from rlsync.adapters import vllm_layers
from rlsync.reload import capture

IN = 16
SHARDS = {"q": 16, "k": 8, "v": 8}


def copy_loader(param, loaded_weight):
    assert param.shape == loaded_weight.shape, (param.shape, loaded_weight.shape)
    param.data.copy_(loaded_weight)


class ToyQuant:
    """Per-row int8 quantization into a transposed kernel weight plus a new `weight_scale`."""

    def __init__(self):
        self.num_processed = 0

    def process_weights_after_loading(self, layer):
        if getattr(layer, "_already_called_process_weights_after_loading", False):
            return
        w = layer.weight.data.float()
        scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-6) / 127
        layer.weight = nn.Parameter(torch.round(w / scale).to(torch.int8).t(), requires_grad=False)
        layer.weight_scale = nn.Parameter(scale, requires_grad=False)
        layer._already_called_process_weights_after_loading = True
        self.num_processed += 1


class ToyArrivalQuant:
    """Quantize-on-arrival protocol: kernel tensors exist from the start, loaders quantize each shard."""

    rlsync_arrival = True

    def __init__(self):
        self.num_processed = 0

    def process_weights_after_loading(self, layer):
        self.num_processed += 1  # nothing to do: shards were quantized as they arrived


class ToyFused(nn.Module):
    """A linear layer whose weight takes shards (`q`, `k`, `v`) like vLLM's QKVParallelLinear."""

    def __init__(self, shards, *, quant=None, bias=False):
        super().__init__()
        self.shards = shards
        out = sum(shards.values())
        self.quant_method = quant
        if isinstance(quant, ToyArrivalQuant):
            weight = nn.Parameter(torch.empty(out, IN, dtype=torch.int8), requires_grad=False)
            weight.weight_loader = self.arrival_loader
            scale = nn.Parameter(torch.empty(out, 1), requires_grad=False)
            scale.weight_loader_numel = 0  # no checkpoint data: the protocol's convention
            self.register_parameter("weight_scale", scale)
        else:
            weight = nn.Parameter(torch.empty(out, IN), requires_grad=False)
            weight.weight_loader = self.weight_loader
        weight.output_dim, weight.input_dim = 0, 1
        self.register_parameter("weight", weight)
        if bias:
            b = nn.Parameter(torch.empty(out), requires_grad=False)
            b.weight_loader, b.output_dim = self.weight_loader, 0
            self.register_parameter("bias", b)

    def weight_loader(self, param, loaded_weight, loaded_shard_id=None):
        if loaded_shard_id is None:
            return copy_loader(param, loaded_weight)
        names = list(self.shards)
        offset = sum(self.shards[n] for n in names[: names.index(loaded_shard_id)])
        param.data.narrow(0, offset, self.shards[loaded_shard_id]).copy_(loaded_weight)


    def arrival_loader(self, param, loaded_weight, loaded_shard_id=None):
        names = list(self.shards)
        name = loaded_shard_id or names[0]
        offset = sum(self.shards[n] for n in names[: names.index(name)])
        w = loaded_weight.float()
        scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-6) / 127
        param.data.narrow(0, offset, self.shards[name]).copy_(torch.round(w / scale).to(torch.int8))
        self.weight_scale.data.narrow(0, offset, self.shards[name]).copy_(scale)


@vllm_layers.register_unquantized_method
class UnquantizedToyHandle:
    """What vLLM's CPU `UnquantizedEmbeddingMethod` does: keep `weight`, derive `cpu_linear`, a closure
    over a packed copy of the weight (the oneDNN handle). Registered as an unquantized method (by type),
    so a tied follower is refreshed like vLLM's."""

    def __init__(self):
        self.num_processed = 0
        self.saw_old_handle = 0
        self.handles: list[weakref.ref] = []

    def process_weights_after_loading(self, layer):
        self.saw_old_handle += "cpu_linear" in layer.__dict__
        packed = layer.weight.detach().t().contiguous()  # the handle's own copy
        layer.cpu_linear = lambda x: x @ packed
        self.handles.append(weakref.ref(packed))
        self.num_processed += 1


class ToyRewrap:
    """Processing that re-wraps `weight` in a new Parameter of the same format (some vLLM methods do)."""

    def process_weights_after_loading(self, layer):
        layer.weight = nn.Parameter(layer.weight.data.clone(), requires_grad=False)


class ToyPlain(nn.Module):
    """A norm / embedding / head: one weight, a plain loader, no processing unless a method is given."""

    def __init__(self, *shape, quant=None):
        super().__init__()
        weight = nn.Parameter(torch.empty(*shape), requires_grad=False)
        weight.weight_loader = copy_loader
        self.weight = weight
        if quant is not None:
            self.quant_method = quant


class ToyBlock(nn.Module):
    def __init__(self, quant_factory):
        super().__init__()
        self.qkv = ToyFused(SHARDS, quant=quant_factory(), bias=True)
        self.down = ToyFused({"w": IN}, quant=quant_factory())
        self.norm = ToyPlain(IN)


class ToyModel(nn.Module):
    """embed, 2 blocks, final norm, head tied to embed (tied after construction, as in vLLM)."""

    packed = {"qkv": ["q", "k", "v"]}

    def __init__(self, quant_factory=ToyQuant, num_layers=2, embed_factory=None, norm_factory=None):
        super().__init__()
        new = lambda factory: None if factory is None else factory()  # noqa: E731
        self.embed = ToyPlain(8, IN, quant=new(embed_factory))
        self.layers = nn.ModuleList(ToyBlock(quant_factory) for _ in range(num_layers))
        self.norm = ToyPlain(IN, quant=new(norm_factory))
        self.head = ToyPlain(8, IN, quant=new(embed_factory))

    def tie(self):
        self.head.weight = self.embed.weight

    def load_weights(self, weights):
        params = dict(self.named_parameters())
        loaded = set()
        for name, tensor in weights:
            if name.startswith("head."):
                continue  # tied
            m = re.fullmatch(r"layers\.(\d+)\.(q|k|v)\.(weight|bias)", name)
            if m:
                target = f"layers.{m[1]}.qkv.{m[3]}"
                params[target].weight_loader(params[target], tensor, m[2])
            elif name.endswith(".w.weight"):
                target = name.replace(".w.", ".down.")
                params[target].weight_loader(params[target], tensor, "w")
            else:
                target = name
                params[target].weight_loader(params[target], tensor)
            loaded.add(target)
        return loaded


def checkpoint_groups(seed=0, num_layers=2):
    """Checkpoint-named tensors (fp32, like a trainer), one group per layer."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    groups = [[("embed.weight", rnd(8, IN))]]
    for i in range(num_layers):
        group = []
        for s, n in SHARDS.items():
            group += [(f"layers.{i}.{s}.weight", rnd(n, IN)), (f"layers.{i}.{s}.bias", rnd(n))]
        group += [(f"layers.{i}.w.weight", rnd(IN, IN)), (f"layers.{i}.norm.weight", rnd(IN))]
        groups.append(group)
    groups.append([("norm.weight", rnd(IN))])
    return groups


def build_toy(seed=0, quant_factory=ToyQuant, **factories):
    """Construct, capture (before processing), tie, load and process: what vLLM does at startup.

    `embed_factory` / `norm_factory` give the embedding + head / final norm a quant method."""
    model = ToyModel(quant_factory, **factories)
    capture(model)
    model.tie()
    model.load_weights([t for g in checkpoint_groups(seed) for t in g])
    for module in model.modules():
        vllm_layers.process_layer(module)
    return model


def kernel_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_bits_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for n in a:
        assert a[n].dtype == b[n].dtype and a[n].shape == b[n].shape, n
        assert torch.equal(a[n].view(torch.uint8) if a[n].dtype == torch.int8 else a[n], b[n].view(torch.uint8) if b[n].dtype == torch.int8 else b[n]), n


# ------------------------------------------------------------ FP8 reference tests (unit and vs-vLLM tiers)
SHAPES = [(256, 256), (300, 200), (7, 130), (129, 1)]
"""Weight shapes the reference quantizer tests cover (square, ragged, tiny, one column)."""


def fp8_bits(t):
    """Raw bits of an e4m3 (1-byte) or fp32 tensor, for exact comparison."""
    return t.contiguous().view(torch.uint8 if t.element_size() == 1 else torch.int32)


def random_weight(shape, seed=0, std=0.02):
    """A seeded Gaussian bf16 weight."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * std).to(torch.bfloat16)


# ------------------------------------------------------------ a run to export (rlsync.rl.export)
ROOT = Path(__file__).resolve().parents[2]
GRPO_TINY = ROOT / "configs/grpo/tiny_cpu_fp8.yaml"


def trained_run(tmp_path, *overrides, steps=(3,), scale=0.02):
    """(run directory, policy): a run of the GRPO tiny config (with `overrides`) whose checkpoints at `steps` hold a
    policy changed by seeded noise on every trainable parameter (a stand-in for training; with LoRA, the A and B
    factors, so the adapters change the model). The policy is the trainer's: fp32, PEFT-wrapped with LoRA."""
    from rlsync.cli import load_recipe_config
    from rlsync.rl import checkpoint
    from rlsync.rl.run import RunDir
    from rlsync.rl.state import TrainState
    from rlsync.rl.tasks import make_task
    from rlsync.rl.trainer_model import load_trainer_model
    from rlsync.trainer import apply_lora

    _, cfg = load_recipe_config(GRPO_TINY, [f"run.output_dir={tmp_path}", "run.name=run", "run.checkpoint_every=1",
                                            *overrides])
    policy = apply_lora(load_trainer_model(cfg.model)[0], cfg.trainer.lora)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    state = TrainState(modules={"policy": policy}, optimizers={"policy": torch.optim.AdamW(trainable)},
                       task=make_task(cfg.task, seed=0))
    with RunDir(cfg.run, cfg) as run:
        for step in steps:
            gen = torch.Generator().manual_seed(step)
            with torch.no_grad():
                for p in trainable:
                    p.add_(torch.randn(p.shape, generator=gen) * scale)
            checkpoint.save_checkpoint(run.path, step, state.state_dict(step), keep=0)
    return run.path, policy
