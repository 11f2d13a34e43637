"""A run's policy as a Hugging Face checkpoint: `rlsync export RUN_DIR OUT`, and `run.export` at a run's end.

Why: a run's checkpoints are `state.pt` files (policy, optimizer, RNGs) that only
a resume reads; a trl run's are transformers checkpoints in the trainer's dtype,
LoRA runs hold adapters. What `vllm serve OUT` and `from_pretrained(OUT)` want
is the base checkpoint's format with the trained values: the same tensor names,
shapes and dtypes, LoRA merged, with config, generation config and tokenizer.

How: the run's `config.yaml` says which model the run started from (`model:`)
and whether it trained LoRA adapters. The export rebuilds that model on the CPU
in the trainer's dtype, loads the checkpoint's policy weights into it (an
rlsync run's `checkpoints/step_N/state.pt`, read with the same checks as a
resume; a trl run's `trl/checkpoint-N`), merges the adapters (PEFT's
`merge_and_unload`, in the trainer's dtype, as every sync merges them), casts
each tensor to the base checkpoint's dtype, and writes `save_pretrained`
safetensors, the tokenizer and `rlsync_export.json` (the run, step and base).
Before OUT appears, the written tensors are compared with the base checkpoint's
(`checkpoint_tensors`): any name, shape or dtype that differs is an
`ExportError`.

Never a half-written OUT: everything is written into `.OUT.tmp-<pid>` next to
OUT, fsynced, and renamed to OUT only after the comparison passes. An existing
non-empty OUT is refused unless `force`, and is then replaced only by that
final rename; OUT may never be the run directory, the base model or a
directory holding either.

Limitations:
1. The whole policy is held in host memory once, in the trainer's dtype
   (`model.dtype`), plus one copy of each tensor while it is cast; `state.pt` is
   memory-mapped, so the optimizer state in it is never read into memory.
2. Only the policy leaves: PPO's value head stays in the checkpoint.
3. DeepSpeed ZeRO runs write no rlsync checkpoints, so there is nothing to
   export; the trl recipe saves only with `run.checkpoint_every` > 0.
4. A base checkpoint holding tensors transformers drops on load (an old
   `rotary_emb.inv_freq`) cannot be matched; the export says which names differ.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from rlsync.config import from_dict
from rlsync.config.loader import read_yaml
from rlsync.errors import CheckpointError, ConfigError, ExportError
from rlsync.rl import checkpoint
from rlsync.rl.run import RunDir
from rlsync.rl.trainer_model import ModelConfig, load_trainer_model, resolve_model_path
from rlsync.trainer import TrainerConfig, apply_lora

log = logging.getLogger(__name__)

EXPORT_DIR = "export"
"""Where `run.export` writes, inside the run directory."""
INFO_FILE = "rlsync_export.json"
"""What an export says about itself: the run, checkpoint, step and base checkpoint it came from."""
TRL_RECIPE = "trl_grpo"
TRL_DIR = "trl"
"""The trl recipe's `output_dir` inside the run directory; transformers writes `checkpoint-N/` there."""
_TRL_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}


@dataclasses.dataclass(kw_only=True, slots=True)
class Exported:
    """What `export_run` wrote."""

    path: Path
    """The Hugging Face checkpoint directory (OUT)."""
    step: int
    """Training step of the checkpoint it was made from."""
    checkpoint: Path
    """That checkpoint's directory."""
    base: Path
    """The base checkpoint the run started from; OUT has its tensor names, shapes and dtypes."""
    lora_merged: bool
    """True if LoRA adapters were merged into the base weights."""
    num_tensors: int
    """Tensors written (as many as the base checkpoint holds)."""


@dataclasses.dataclass(kw_only=True, slots=True)
class _Policy:
    model: torch.nn.Module
    tokenizer: Any
    step: int
    checkpoint: Path
    lora_merged: bool


def export_run(run_dir: str | Path, out: str | Path, *, step: int | None = None, force: bool = False) -> Exported:
    """Write the policy of run `run_dir` at `step` (None: its newest intact checkpoint) to `out` as a Hugging Face
    checkpoint with the base checkpoint's tensor names and dtypes, LoRA merged.

    Raises `ConfigError` (not a run directory, `out` not writable as asked), `CheckpointError` (no checkpoint,
    a damaged one, one that does not fit the run's model) or `ExportError` (the result differs from the base);
    `out` is then left as it was.
    """
    started = time.perf_counter()
    run_dir, out = Path(run_dir), Path(os.path.abspath(out))  # "." and "x/.." as the directory they name
    raw = run_config(run_dir)
    model_cfg = dataclasses.replace(_section(ModelConfig, raw, "model"), device="cpu", gradient_checkpointing=False)
    base = Path(resolve_model_path(model_cfg))
    _check_out(out, force=force, protected={"run directory": run_dir, "base model": base})
    if raw.get("recipe") == TRL_RECIPE:
        policy = _trl_policy(run_dir, model_cfg, base, step)
    else:
        policy = _rlsync_policy(run_dir, raw, model_cfg, step)
    base_tensors = checkpoint_tensors(base)
    _cast_like(policy.model, base_tensors)

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        log.info(f"export: writing safetensors, config and tokenizer into {tmp}")
        if not torch.cuda.is_available():  # save_pretrained imports DeepSpeed where installed, which warns on a
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # host without a GPU unless told (as trainer.wrap does)
        policy.model.save_pretrained(tmp, safe_serialization=True)
        policy.tokenizer.save_pretrained(tmp)
        problems = compare_tensors(checkpoint_tensors(tmp), base_tensors)
        if problems:
            more = f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""
            raise ExportError(f"the export of {policy.checkpoint} does not match the base checkpoint {base}: "
                              f"{'; '.join(problems[:8])}{more}")
        info = {"run": str(run_dir), "checkpoint": str(policy.checkpoint), "step": policy.step, "base": str(base),
                "lora_merged": policy.lora_merged}
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=1) + "\n")
        _fsync_tree(tmp)
        _replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    log.info(f"export: wrote {out} (step {policy.step}, {len(base_tensors)} tensors named and typed as {base}, "
             f"{size / 2**20:.1f} MiB) in {time.perf_counter() - started:.1f} s")
    return Exported(path=out, step=policy.step, checkpoint=policy.checkpoint, base=base,
                    lora_merged=policy.lora_merged, num_tensors=len(base_tensors))


def export_at_end(run: RunDir) -> Exported | None:
    """`run.export`: export the run's newest checkpoint into `<run dir>/export` (replacing an older export).

    Call after the last checkpoint is written; only the writing rank (rank 0) exports. Does nothing without
    `run.export`, or when the export there already holds that checkpoint (a resume of a finished run).
    """
    if not run.config.export or not run.writer:
        return None
    out = run.path / EXPORT_DIR
    info = export_info(out)
    newest = _newest_checkpoint(run.path)
    if info is not None and newest is not None and info.get("checkpoint") == str(newest):
        log.info(f"export: {out} already holds {newest}")
        return None
    return export_run(run.path, out, force=True)


def export_info(path: str | Path) -> dict[str, Any] | None:
    """What the export in `path` says about itself (`INFO_FILE`), None if `path` holds no rlsync export."""
    try:
        info = json.loads((Path(path) / INFO_FILE).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def run_config(run_dir: Path) -> dict[str, Any]:
    """The resolved config a run saved (`config.yaml`), as plain data; `ConfigError` if `run_dir` is not a run."""
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: no such run directory")
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no config.yaml); give the directory `rlsync run` "
                          f"wrote, e.g. runs/grpo-tiny-fp8")
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return raw


def checkpoint_tensors(path: str | Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (safetensors dtype, shape) of every tensor of the Hugging Face checkpoint in `path`, read from the
    files' headers (the index's shards, or every `*.safetensors` file); nothing else is read."""
    from safetensors import safe_open

    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({path / name for name in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ExportError(f"{path} holds no *.safetensors weights")
    tensors = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is no mapping)
                part = f.get_slice(name)
                tensors[name] = (part.get_dtype(), tuple(part.get_shape()))
    return tensors


def compare_tensors(got: dict[str, tuple[str, tuple[int, ...]]],
                    want: dict[str, tuple[str, tuple[int, ...]]]) -> list[str]:
    """Every difference between two `checkpoint_tensors` results, in words (empty: same names, shapes, dtypes)."""
    problems = [f"{name} is missing" for name in sorted(want.keys() - got.keys())]
    problems += [f"{name} is not in the base" for name in sorted(got.keys() - want.keys())]
    for name in sorted(want.keys() & got.keys()):
        if got[name] != want[name]:
            problems.append(f"{name} is {got[name][0]} {list(got[name][1])}, the base's {want[name][0]} "
                            f"{list(want[name][1])}")
    return problems


# ------------------------------------------------------------ the policy, from either kind of run
def _rlsync_policy(run_dir: Path, raw: dict[str, Any], model_cfg: ModelConfig, step: int | None) -> _Policy:
    """An rlsync recipe's policy: `checkpoints/step_N/state.pt` into the run's model (LoRA applied, then merged)."""
    root = checkpoint.checkpoint_dir(run_dir)
    if step is None:
        log.info(f"export: finding the newest intact checkpoint in {root} (every file's sha256 checked)")
        found = checkpoint.load_latest(run_dir, mmap=True)
        if found is None:
            raise CheckpointError(f"{run_dir} holds no checkpoint to export ({root} is empty or missing); a run "
                                  f"saves one every run.checkpoint_every steps and after its last step, when "
                                  f"run.checkpoint_every > 0")
        path, state = found
        del found
    else:
        path = root / checkpoint.step_name(step)
        if path not in checkpoint.step_dirs(root):
            have = [checkpoint.checkpoint_step(p) for p in checkpoint.complete_checkpoints(root)]
            raise CheckpointError(f"{run_dir} has no checkpoint of step {step} (complete checkpoints: "
                                  f"{', '.join(map(str, have)) or 'none'})")
        log.info(f"export: checking {path} (every file's sha256)")
        state = checkpoint.load_checkpoint(path, mmap=True)
    weights = state.get("modules", {}).get("policy")
    if not isinstance(weights, dict):
        raise CheckpointError(f"{path / checkpoint.STATE_FILE} holds no policy weights (modules.policy)")
    lora = _section(TrainerConfig, raw, "trainer").lora
    log.info(f"export: building the run's model from {model_cfg.path or f'the built-in {model_cfg.builtin}'}"
             + (f" with LoRA r={lora.r}" if lora.r else ""))
    model, _, tokenizer = load_trainer_model(model_cfg)
    model = apply_lora(model, lora)
    try:
        model.load_state_dict(_unwrapped(weights))
    except RuntimeError as exc:
        raise CheckpointError(f"{path / checkpoint.STATE_FILE}: its policy does not fit the model the run's config "
                              f"builds ({str(exc).splitlines()[0][:300]}...)") from exc
    del state, weights
    if lora.r:
        log.info("export: merging the LoRA adapters into the base weights")
        model = model.merge_and_unload()
    return _Policy(model=model.eval(), tokenizer=tokenizer, step=checkpoint.checkpoint_step(path), checkpoint=path,
                   lora_merged=bool(lora.r))


def _trl_policy(run_dir: Path, model_cfg: ModelConfig, base: Path, step: int | None) -> _Policy:
    """The trl recipe's policy: transformers' `trl/checkpoint-N` (full weights, or a PEFT adapter merged into the
    run's base model). Pickled files there (optimizer.pt, training_args.bin) are never read."""
    path = _trl_checkpoint(run_dir, step)
    num = int(_TRL_CHECKPOINT.match(path.name).group(1))
    if (path / "adapter_config.json").is_file():
        from peft import PeftModel

        log.info(f"export: building the run's model and loading the LoRA adapter of {path}")
        model, _, tokenizer = load_trainer_model(model_cfg)
        model = PeftModel.from_pretrained(model, path, is_trainable=False).merge_and_unload()
        return _Policy(model=model.eval(), tokenizer=tokenizer, step=num, checkpoint=path, lora_merged=True)
    if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
        raise CheckpointError(f"{path} holds neither a PEFT adapter nor config.json and *.safetensors weights")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info(f"export: loading the trained weights of {path}")
    tokenizer = AutoTokenizer.from_pretrained(base, trust_remote_code=model_cfg.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, model_cfg.dtype), use_safetensors=True,
                                                 trust_remote_code=model_cfg.trust_remote_code)
    return _Policy(model=model.eval(), tokenizer=tokenizer, step=num, checkpoint=path, lora_merged=False)


def _trl_checkpoint(run_dir: Path, step: int | None) -> Path:
    """`trl/checkpoint-<step>`, or the newest complete one: transformers writes `trainer_state.json` last."""
    root = run_dir / TRL_DIR
    complete = trl_checkpoints(run_dir)
    if step is not None:
        path = root / f"checkpoint-{step}"
        if path not in complete:
            raise CheckpointError(f"{run_dir} has no complete trl checkpoint of step {step} (complete: "
                                  f"{', '.join(p.name for p in complete) or 'none'})")
        return path
    if not complete:
        raise CheckpointError(f"{run_dir} holds no trl checkpoint to export ({root}/checkpoint-N is missing); the "
                              f"trl recipe saves one every run.checkpoint_every steps and after its last step, when "
                              f"run.checkpoint_every > 0")
    return complete[-1]


def trl_checkpoints(run_dir: str | Path) -> list[Path]:
    """A trl run's complete transformers checkpoints (`trl/checkpoint-N` with `trainer_state.json`), oldest first."""
    root = Path(run_dir) / TRL_DIR
    found = [(int(m.group(1)), p) for p in root.glob("checkpoint-*")
             if (m := _TRL_CHECKPOINT.match(p.name)) and (p / "trainer_state.json").is_file()]
    return [p for _, p in sorted(found)]


def _newest_checkpoint(run_dir: Path) -> Path | None:
    if run_config(run_dir).get("recipe") == TRL_RECIPE:
        return (trl_checkpoints(run_dir) or [None])[-1]
    return checkpoint.find_intact(run_dir)


# ------------------------------------------------------------ helpers
def _section(cls: type, raw: dict[str, Any], key: str):
    """Config section `key` of a saved run config as `cls` (its defaults where the run predates a key)."""
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"config.yaml: {key} must be a mapping")
    return from_dict(cls, value, f"{key}.")


def _unwrapped(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The policy's state dict without DDP's `module.` prefix (a one-rank DDP run saves the wrapper's own
    state dict; distributed saves go through torch's `get_state_dict`, which strips it)."""
    if weights and all(name.startswith("module.") for name in weights):
        return {name.removeprefix("module."): tensor for name, tensor in weights.items()}
    return weights


def _cast_like(model: torch.nn.Module, base: dict[str, tuple[str, tuple[int, ...]]]) -> None:
    """Cast `model` to the base checkpoint's floating dtype: the most common one, then each parameter the base
    stores in another dtype under the same name (a float32 norm in a bfloat16 checkpoint)."""
    dtypes = Counter(dtype for dtype, _ in base.values() if dtype in _SAFETENSORS_DTYPES)
    if not dtypes:
        return
    model.to(_SAFETENSORS_DTYPES[dtypes.most_common(1)[0][0]])
    for name, param in model.named_parameters():
        dtype = _SAFETENSORS_DTYPES.get(base.get(name, ("",))[0])
        if dtype is not None and param.dtype != dtype:
            param.data = param.data.to(dtype)


def _check_out(out: Path, *, force: bool, protected: dict[str, Path]) -> None:
    """Refuse an `out` that exists as a file, holds files (unless `force`), or is or holds a protected path."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ConfigError(f"{out} exists and is not a directory; choose another OUT")
    for what, path in protected.items():
        if path.resolve() == out.resolve() or path.resolve().is_relative_to(out.resolve()):
            raise ConfigError(f"OUT {out} is or holds the {what} {path}; choose another OUT")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConfigError(f"{out} exists and is not empty; pass --force to replace it, or choose another OUT")


def _replace(tmp: Path, out: Path) -> None:
    """Rename `tmp` to `out`, replacing an existing `out` (moved aside first, deleted after)."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.rename(out, old)
    os.rename(tmp, out)
    checkpoint.fsync_path(out.parent)
    shutil.rmtree(old, ignore_errors=True)


def _fsync_tree(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            checkpoint.fsync_path(file)
    checkpoint.fsync_path(path)
