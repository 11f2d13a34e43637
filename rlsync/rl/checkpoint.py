"""Atomic run checkpoints: a run killed mid-write never leaves a corrupt latest checkpoint.

Layout under `<run dir>/checkpoints/`:

    step_000006/state.pt        everything `TrainState.state_dict()` returns
    step_000006/manifest.json   written last: step, each file's byte size and sha256
    latest                      one line, `step_000006`, replaced atomically

Why this order: a checkpoint is written into `.tmp-step_NNNNNN-<pid>/`, every
file and the directory are fsynced, the manifest goes in last, then the
directory is renamed to `step_NNNNNN` and only then is `latest` replaced (write
a temp file, fsync, `os.replace`). Whatever instant a run dies at, `latest`
names a complete checkpoint or the previous one, and `find_latest` trusts no
pointer blindly: it checks the manifest (sizes always, hashes on request) and
falls back to the newest complete `step_*` directory, skipping partial ones.

Limitations:
1. One writer: the caller decides which rank writes (rank 0 in the recipes).
2. `keep` prunes old checkpoints after a successful write; a run that writes
   many checkpoints with `keep=0` keeps them all.
3. Hash verification reads every byte again; `find_latest(verify_hashes=True)`
   is for tests and paranoid resumes, the default checks sizes only.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "state.pt"
MANIFEST = "manifest.json"
LATEST = "latest"
_STEP_DIR = re.compile(r"^step_(\d{6,})$")


def checkpoint_dir(run_path: str | Path) -> Path:
    return Path(run_path) / "checkpoints"


def step_name(step: int) -> str:
    return f"step_{step:06d}"


def save_checkpoint(run_path: str | Path, step: int, state: dict[str, Any], *, keep: int = 2) -> Path:
    """Write `state` as the checkpoint of `step` atomically; returns its directory.

    `keep` > 0 deletes all but the newest `keep` complete checkpoints afterwards.
    """
    root = checkpoint_dir(run_path)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_name(step)
    tmp = root / f".tmp-{step_name(step)}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    state_path = tmp / STATE_FILE
    with state_path.open("wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    meta = {"bytes": state_path.stat().st_size, "sha256": _sha256(state_path)}
    manifest = {"step": step, "files": {STATE_FILE: meta}}
    _write_durably(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
    _fsync_dir(tmp)
    if final.exists():  # a complete checkpoint of this step from before a resume: this one replaces it
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    pointer = root / f".{LATEST}.tmp-{os.getpid()}"
    _write_durably(pointer, (final.name + "\n").encode())
    os.replace(pointer, root / LATEST)
    _fsync_dir(root)
    if keep > 0:
        for old in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old)
    return final


def complete_checkpoints(root: str | Path, *, verify_hashes: bool = False) -> list[Path]:
    """Complete `step_*` directories under `root`, oldest first (partial ones skipped)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and path.is_dir() and is_complete(path, verify_hashes=verify_hashes):
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def is_complete(path: str | Path, *, verify_hashes: bool = False) -> bool:
    """True if `path` has a manifest and every file it lists, with the recorded size (and hash)."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    for name, meta in files.items():
        file = path / name
        if not file.is_file() or file.stat().st_size != meta["bytes"]:
            return False
        if verify_hashes and _sha256(file) != meta["sha256"]:
            return False
    return True


def find_latest(run_path: str | Path, *, verify_hashes: bool = False) -> Path | None:
    """The checkpoint a resume should load: `latest` if complete, else the newest complete one."""
    root = checkpoint_dir(run_path)
    pointer = root / LATEST
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if _STEP_DIR.match(named.name) and is_complete(named, verify_hashes=verify_hashes):
            return named
    complete = complete_checkpoints(root, verify_hashes=verify_hashes)
    return complete[-1] if complete else None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The state saved in checkpoint directory `path` (tensors on CPU)."""
    path = Path(path)
    if not is_complete(path):
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no manifest, or a file is missing or truncated)")
    # weights_only=False: the state holds Python RNG tuples and numpy-free plain data
    # that this process wrote itself; never point this at checkpoints you did not write.
    return torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)


def checkpoint_step(path: str | Path) -> int:
    match = _STEP_DIR.match(Path(path).name)
    if not match:
        raise ValueError(f"{path} is not a step_NNNNNN checkpoint directory")
    return int(match.group(1))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_durably(path: Path, data: bytes) -> None:
    with path.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
