"""`rlsync export`: a run's policy as a Hugging Face checkpoint with the base checkpoint's names and dtypes, LoRA
merged, from rlsync's checkpoints and from the trl recipe's; refusals leave OUT as it was. No engine here (the
export loaded by vLLM: tests/integration/test_export_engine.py)."""

import json
import os

import pytest
import torch
import yaml
from safetensors.torch import load_file

from rlsync.cli import main
from rlsync.default_model import family_spec, tiny_model_path
from rlsync.errors import CheckpointError, ConfigError, ExportError
from rlsync.rl import checkpoint, export
from rlsync.rl.export import INFO_FILE, export_at_end, export_run
from rlsync.rl.run import RunConfig, RunDir
from rlsync.rl.summary import RunSummary, format_summary
from tests.unit.support import trained_run


def tensors(path):
    """Every tensor of the safetensors checkpoint in `path` (independent of `export.checkpoint_tensors`)."""
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def assert_like_base(out, base):
    got, want = tensors(out), tensors(base)
    assert sorted(got) == sorted(want)
    assert {n: (t.dtype, t.shape) for n, t in got.items()} == {n: (t.dtype, t.shape) for n, t in want.items()}
    return got, want


def test_export_has_the_base_names_and_dtypes_and_the_trained_values(tmp_path):
    run, policy = trained_run(tmp_path, steps=(2, 3))
    out = tmp_path / "hf"
    exported = export_run(run, out)

    base = tiny_model_path()
    got, want = assert_like_base(out, base)  # bf16 on disk although the trainer is fp32
    assert all(t.dtype == torch.bfloat16 for t in got.values())
    trained = policy.state_dict()  # the step-3 weights (the trainer's dense names are the checkpoint's)
    for name, tensor in got.items():
        assert torch.equal(tensor, trained[name].to(torch.bfloat16)), name
    assert any(not torch.equal(got[n], want[n]) for n in got), "the export holds the base weights"

    assert (exported.step, exported.lora_merged, exported.num_tensors) == (3, False, len(want))
    assert json.loads((out / INFO_FILE).read_text())["checkpoint"] == str(run / "checkpoints" / "step_000003")
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".hf.")]  # no temp dir left

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)  # loads as any checkpoint does
    assert model.dtype == torch.bfloat16 and len(AutoTokenizer.from_pretrained(out)) == 64

    # --step picks an older checkpoint
    older = export_run(run, tmp_path / "hf2", step=2)
    norm = "model.norm.weight"
    assert older.step == 2 and torch.equal(tensors(tmp_path / "hf2")[norm], torch.load(
        run / "checkpoints" / "step_000002" / "state.pt")["modules"]["policy"][norm].to(torch.bfloat16))
    assert not torch.equal(tensors(tmp_path / "hf2")[norm], got[norm])


def test_lora_export_is_base_plus_the_scaled_adapter_product(tmp_path):
    run, policy = trained_run(tmp_path, "trainer.lora.r=4", "trainer.lora.alpha=8",
                              "trainer.lora.target_modules=[q_proj, down_proj]")
    out = tmp_path / "hf"
    assert export_run(run, out).lora_merged
    got, want = assert_like_base(out, tiny_model_path())  # no lora_A / base_layer names

    modules = dict(policy.named_modules())
    num_merged = 0
    for name, tensor in got.items():
        module = modules.get(f"base_model.model.{name.removesuffix('.weight')}")
        if name.endswith(".weight") and hasattr(module, "lora_A"):
            w = module.base_layer.weight.detach()
            a, b = module.lora_A["default"].weight.detach(), module.lora_B["default"].weight.detach()
            expected = (w + (b @ a) * (8 / 4)).to(torch.bfloat16)  # PEFT's merge, in the trainer's fp32
            assert torch.equal(tensor, expected), name
            assert not torch.equal(tensor, want[name]), f"{name}: the adapter changed nothing"
            num_merged += 1
        else:
            assert torch.equal(tensor, want[name]), f"{name} has no adapter and must be the base's"
    assert num_merged == 2 * 2  # q_proj and down_proj in both layers


def test_moe_export_is_in_checkpoint_format(tmp_path):
    # transformers 5 fuses MoE experts in memory; the export must hold the checkpoint's per-expert tensors
    run, _ = trained_run(tmp_path, "model.builtin=qwen3_moe")
    export_run(run, tmp_path / "hf")
    got, _ = assert_like_base(tmp_path / "hf", tiny_model_path(family_spec("qwen3_moe")))
    assert "model.layers.0.mlp.experts.7.down_proj.weight" in got


def test_refusals_leave_out_as_it_was(tmp_path, monkeypatch):
    run, _ = trained_run(tmp_path)
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty; pass --force"):
        export_run(run, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    monkeypatch.chdir(tmp_path)
    for bad in (run, tmp_path, ".", run / ".."):  # --force would replace the run itself
        with pytest.raises(ConfigError, match="is or holds the run directory"):
            export_run(run, bad, force=True)
    with pytest.raises(ConfigError, match="is or holds the base model"):
        export_run(run, tiny_model_path().parent, force=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        export_run(run, tmp_path / "file", force=True)

    # a failure after writing (here: the result differs from the base) leaves neither OUT changed nor a temp dir
    real = export.compare_tensors
    export.compare_tensors = lambda got, want: ["model.norm.weight is F32 [256], the base's BF16 [256]"]
    try:
        with pytest.raises(ExportError, match="does not match the base checkpoint"):
            export_run(run, out, force=True)
    finally:
        export.compare_tensors = real
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".hf.")]

    export_run(run, out, force=True)  # --force replaces it, once complete
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_compare_tensors_names_every_difference():
    base = {"a": ("BF16", (2, 2)), "b": ("BF16", (2,)), "c": ("BF16", (3,))}
    got = {"a": ("F32", (2, 2)), "b": ("BF16", (2,)), "d": ("BF16", (1,))}
    assert export.compare_tensors(got, base) == [
        "c is missing", "d is not in the base", "a is F32 [2, 2], the base's BF16 [2, 2]"]
    assert export.compare_tensors(base, base) == []


def test_missing_and_damaged_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such run directory"):
        export_run(tmp_path / "nope", tmp_path / "hf")
    with pytest.raises(ConfigError, match=r"not a run directory \(no config.yaml\)"):
        export_run(tmp_path, tmp_path / "hf")

    run, _ = trained_run(tmp_path, steps=(1, 2))
    with pytest.raises(CheckpointError, match=r"no checkpoint of step 7 \(complete checkpoints: 1, 2\)"):
        export_run(run, tmp_path / "hf", step=7)
    state = run / "checkpoints" / "step_000002" / "state.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit: the manifest's sha256 catches it
    state.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256 does not match"):
        export_run(run, tmp_path / "hf", step=2)
    with pytest.warns(UserWarning, match="skipping damaged checkpoint"):  # the newest intact one, as a resume
        assert export_run(run, tmp_path / "hf").step == 1

    for step_dir in checkpoint.step_dirs(run / "checkpoints"):
        (step_dir / "state.pt").unlink()
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        export_run(run, tmp_path / "hf3")


def test_a_run_without_checkpoints_says_how_to_get_one(tmp_path):
    run, _ = trained_run(tmp_path, steps=())
    with pytest.raises(CheckpointError, match="holds no checkpoint to export.*run.checkpoint_every > 0"):
        export_run(run, tmp_path / "hf")


def test_a_checkpoint_of_another_model_does_not_load(tmp_path):
    run, _ = trained_run(tmp_path)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["trainer"]["lora"]["r"] = 4  # the config now says LoRA, the checkpoint has none
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(CheckpointError, match="does not fit the model the run's config builds"):
        export_run(run, tmp_path / "hf")


def test_cli_export_prints_progress_and_exit_codes(tmp_path, capsys):
    run, _ = trained_run(tmp_path)
    assert main(["export", str(run), str(tmp_path / "hf")]) == 0
    err = capsys.readouterr().err
    assert "rlsync: export: building the run's model" in err
    assert f"rlsync: export: wrote {tmp_path / 'hf'} (step 3, 26 tensors" in err
    assert main(["export", str(run), str(tmp_path / "hf")]) == 2  # OUT exists
    assert "exists and is not empty; pass --force" in capsys.readouterr().err
    assert main(["export", str(run), str(tmp_path / "hf"), "--force", "--step", "3"]) == 0
    assert main(["export", str(run), str(tmp_path / "hf4"), "--step", "9"]) == 1
    assert "CheckpointError: " in capsys.readouterr().err and not (tmp_path / "hf4").exists()


def test_run_export_at_the_end_and_in_the_summary(tmp_path):
    with pytest.raises(ConfigError, match="run.export: the export is made from the run's final checkpoint"):
        RunConfig(export=True).validate()
    run_path, _ = trained_run(tmp_path, "run.export=true")
    config = RunConfig(output_dir=str(tmp_path), name="run", export=True, checkpoint_every=1)
    run = RunDir(config, yaml.safe_load((run_path / "config.yaml").read_text()), resume=True)
    assert RunSummary.from_run(run_path).rows()[-1] == (
        "exported", f"not exported: rlsync export {run_path} {run_path / 'export'}")

    exported = export_at_end(run)
    assert exported.path == run_path / "export" and exported.step == 3
    assert f"  exported     {run_path / 'export'} (step 3)" in format_summary(RunSummary.from_run(run_path))
    mtime = os.stat(run_path / "export" / "model.safetensors").st_mtime_ns
    assert export_at_end(run) is None  # a resume of the finished run: the export already holds step 3
    assert os.stat(run_path / "export" / "model.safetensors").st_mtime_ns == mtime
    run.config.export = False
    assert export_at_end(run) is None


# ------------------------------------------------------------ the trl recipe's checkpoints
def trl_run(tmp_path, *, lora: bool):
    """A trl recipe run directory as transformers writes one: `trl/checkpoint-N` with trainer_state.json, the
    weights in the trainer's fp32 (or a PEFT adapter); returns (run dir, the trained model)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    run = tmp_path / "trl-run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"recipe": "trl_grpo", "model": {"path": None,
                                                                                     "dtype": "float32"}}))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path(), dtype=torch.float32)
    if lora:
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj"]))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    for step in (5, 10):
        ckpt = run / "trl" / f"checkpoint-{step}"
        model.save_pretrained(ckpt)
        (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (run / "trl" / "checkpoint-15").mkdir()  # a half-written one: no trainer_state.json
    return run, model


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_trl_checkpoints_export_like_rlsync_ones(tmp_path, lora):
    run, model = trl_run(tmp_path, lora=lora)
    exported = export_run(run, tmp_path / "hf")
    assert exported.step == 10 and exported.lora_merged == lora
    assert exported.checkpoint == run / "trl" / "checkpoint-10"
    got, want = assert_like_base(tmp_path / "hf", tiny_model_path())  # fp32 trl weights -> the base's bf16
    merged = model.merge_and_unload() if lora else model
    for name, tensor in merged.state_dict().items():
        if name in got:
            assert torch.equal(got[name], tensor.to(torch.bfloat16)), name
    assert not torch.equal(got["model.layers.0.self_attn.v_proj.weight"],
                           want["model.layers.0.self_attn.v_proj.weight"])
    with pytest.raises(CheckpointError, match=r"no complete trl checkpoint of step 15 \(complete: "
                                              r"checkpoint-5, checkpoint-10\)"):
        export_run(run, tmp_path / "hf2", step=15)
