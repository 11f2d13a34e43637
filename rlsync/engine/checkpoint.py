"""Names and shapes of a Hugging Face checkpoint, read from safetensors headers.

The engine validates every incoming tensor against this index *before* any
load, so a wrong name or shape fails with the offending name and writes nothing
for that tensor. Reading headers costs no tensor data.
"""

from __future__ import annotations

from pathlib import Path

from safetensors import safe_open


def checkpoint_shapes(model_dir: str | Path) -> dict[str, tuple[int, ...]]:
    """`{name: shape}` for every tensor in the checkpoint's safetensors files."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors files in {model_dir}")
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes
