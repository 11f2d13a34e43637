"""Atomic, verified run checkpoints: a killed write never leaves a corrupt latest checkpoint,
and a damaged or crafted one is never trusted.

Layout under `<run dir>/checkpoints/`:

    step_000006/state.pt        everything `TrainState.state_dict()` returns
    step_000006/manifest.json   written last: step, each file's byte size and sha256
    latest                      one line, `step_000006`, replaced atomically

Why this order: a checkpoint is written into `.tmp-step_NNNNNN-<pid>/`, every
file and the directory are fsynced, the manifest goes in last, then the
directory is renamed to `step_NNNNNN` and only then is `latest` replaced (write
a temp file, fsync, `os.replace`). Whatever instant a run dies at, `latest`
names a complete checkpoint or the previous one.

Why nothing is trusted on load: a checkpoint directory may have been damaged
(a flipped bit, a half-copied file) or crafted. `load_checkpoint` checks every
file's sha256 against the manifest, then reads `state.pt` with
`torch.load(weights_only=True)`, which builds only tensors and plain Python
containers and refuses anything else (a pickled `os.system` call is an error,
not a command). The `latest` pointer must hold a bare `step_NNNNNN` name, and
the checkpoints directory, each step directory and each file must resolve
inside the run directory; anything else raises `CheckpointError`.
`load_latest`, what a resume calls, falls back from a damaged checkpoint to the
newest intact one with a warning naming the damage.

Limitations:
1. One writer: the caller decides which rank writes (rank 0 in the recipes).
2. `keep` prunes old checkpoints after a successful write; a run that writes
   many checkpoints with `keep=0` keeps them all.
3. `find_latest` and `complete_checkpoints` check sizes only unless asked
   (`verify_hashes=True`); `load_checkpoint` always reads every byte twice
   (hash, then load).
4. The manifest proves integrity, not origin: whoever can write the run
   directory can write a consistent manifest. What keeps such a checkpoint
   harmless is the weights-only load.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from rlsync.errors import CheckpointError

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
    root = _checkpoint_root(run_path)
    root.mkdir(parents=True, exist_ok=True)
    step_dirs(root)  # refuses a step directory that resolves outside the run directory, before writing
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
    fsync_path(tmp)
    if final.exists():  # a complete checkpoint of this step from before a resume: this one replaces it
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_path(root)
    pointer = root / f".{LATEST}.tmp-{os.getpid()}"
    _write_durably(pointer, (final.name + "\n").encode())
    os.replace(pointer, root / LATEST)
    fsync_path(root)
    if keep > 0:
        for old in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old)
    return final


def complete_checkpoints(root: str | Path, *, verify_hashes: bool = False) -> list[Path]:
    """Complete `step_*` directories under checkpoints directory `root`, oldest first (partial ones skipped)."""
    return [path for path in step_dirs(root) if is_complete(path, verify_hashes=verify_hashes)]


def step_dirs(root: str | Path) -> list[Path]:
    """Every `step_*` directory under checkpoints directory `root`, oldest first; one outside `root` is refused."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and path.is_dir():
            _require_inside(path, root, what="checkpoint directory")
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def is_complete(path: str | Path, *, verify_hashes: bool = False) -> bool:
    """True if `path` has a manifest and every file it lists, with the recorded size (and hash)."""
    return damage(path, verify_hashes=verify_hashes) is None


def damage(path: str | Path, *, verify_hashes: bool = True) -> str | None:
    """What is wrong with checkpoint directory `path`, in words; None if it is intact."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
        step = manifest["step"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{MANIFEST} is missing or unreadable"
    if not isinstance(files, dict) or STATE_FILE not in files:
        return f"{MANIFEST} lists no {STATE_FILE}"
    if _STEP_DIR.match(path.name) and step != checkpoint_step(path):
        return f"{MANIFEST} is for step {step!r}, the directory for step {checkpoint_step(path)}"
    for name, meta in files.items():
        if not isinstance(name, str) or Path(name).name != name or name in (".", ".."):
            return f"{MANIFEST} lists {name!r}, which is not a file name inside the checkpoint"
        file = path / name
        if file.is_symlink() or not file.is_file():
            return f"{name} is missing"
        if not isinstance(meta, dict) or file.stat().st_size != meta.get("bytes"):
            return f"{name} is {file.stat().st_size} bytes, the manifest says {_get(meta, 'bytes')}"
        if verify_hashes and _sha256(file) != meta.get("sha256"):
            return f"{name}: sha256 does not match the manifest (the file was changed after it was written)"
    return None


def find_latest(run_path: str | Path, *, verify_hashes: bool = False) -> Path | None:
    """The newest complete checkpoint: the one `latest` names if complete, else the newest complete one."""
    root = _checkpoint_root(run_path)
    dirs = step_dirs(root)  # refuses one that resolves outside the run directory
    named = _pointer_target(root)
    if named is not None and is_complete(named, verify_hashes=verify_hashes):
        return named
    complete = [path for path in dirs if is_complete(path, verify_hashes=verify_hashes)]
    return complete[-1] if complete else None


def load_latest(run_path: str | Path, *, mmap: bool = False) -> tuple[Path, dict[str, Any]] | None:
    """(directory, state) of the newest intact checkpoint of a run; None if it has none (`mmap`: see
    `load_checkpoint`).

    Tries the one `latest` names, then every `step_*` directory newest first;
    each damaged one is skipped with a warning naming the damage. Raises
    `CheckpointError` if checkpoints exist but none is intact, or if `latest`
    or a checkpoint path points outside the run directory.
    """
    root = _checkpoint_root(run_path)
    problems = []
    for path in _resume_candidates(root):
        try:
            return path, load_checkpoint(path, mmap=mmap)
        except CheckpointError as exc:
            problems.append(str(exc))
            warnings.warn(f"skipping damaged checkpoint {exc}; trying the next older one", stacklevel=2)
    if problems:
        raise CheckpointError(f"no intact checkpoint in {root}: " + "; ".join(problems))
    return None


def find_intact(run_path: str | Path) -> Path | None:
    """The checkpoint `load_latest` would load, found without loading it (every file's sha256 checked); None if
    the run has no intact checkpoint. The two differ only for a checkpoint whose files match their manifest but
    whose `state.pt` is not loadable as tensors and plain data: this returns it, `load_latest` skips it."""
    root = _checkpoint_root(run_path)
    return next((path for path in _resume_candidates(root) if damage(path, verify_hashes=True) is None), None)


def _resume_candidates(root: Path) -> list[Path]:
    """Checkpoint directories in the order a resume tries them: the one `latest` names, then newest first."""
    dirs = step_dirs(root)  # refuses one that resolves outside the run directory
    candidates = [path for path in [_pointer_target(root)] if path is not None and path.is_dir()]
    return candidates + [path for path in reversed(dirs) if path not in candidates]


def load_checkpoint(path: str | Path, *, mmap: bool = False) -> dict[str, Any]:
    """The state saved in checkpoint directory `path` (tensors on CPU), after checking every file's hash.

    `mmap=True` maps `state.pt` instead of reading it into memory: a reader that needs only the policy
    weights (an export) never pages in the optimizer's moments.

    Raises `CheckpointError` if a file is missing or changed, or if `state.pt`
    holds anything but tensors and plain data (it is never unpickled as code).
    """
    path = Path(path)
    problem = damage(path, verify_hashes=True)
    if problem is not None:
        raise CheckpointError(f"{path}: {problem}")
    try:
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True, mmap=mmap)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as exc:
        raise CheckpointError(f"{path / STATE_FILE}: not loadable as tensors and plain data "
                              f"({type(exc).__name__}: {_first_line(exc)})") from exc
    if not isinstance(state, dict) or state.get("step") != checkpoint_step(path):
        raise CheckpointError(f"{path / STATE_FILE}: not a state saved at step {checkpoint_step(path)}")
    return state


def _checkpoint_root(run_path: str | Path) -> Path:
    root = checkpoint_dir(run_path)
    if root.exists():
        _require_inside(root, Path(run_path), what="checkpoints directory")
    return root


def _pointer_target(root: Path) -> Path | None:
    """The directory `latest` names (not necessarily complete), None without a pointer; refuses any other path."""
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    try:
        name = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{pointer}: unreadable ({exc}); delete it to resume from the newest complete "
                              f"checkpoint") from exc
    if not _STEP_DIR.match(name):
        raise CheckpointError(f"{pointer} holds {name[:200]!r}, not a step_NNNNNN directory name inside {root}; "
                              f"refusing to follow it (delete it to resume from the newest complete checkpoint)")
    target = root / name
    if target.exists():
        _require_inside(target, root, what="checkpoint directory")
    return target


def _require_inside(path: Path, parent: Path, *, what: str) -> None:
    if not path.resolve().is_relative_to(parent.resolve()):
        raise CheckpointError(f"{what} {path} resolves to {path.resolve()}, outside {parent.resolve()}; "
                              f"refusing to read or write checkpoints there")


def _get(meta: Any, key: str) -> Any:
    return meta.get(key) if isinstance(meta, dict) else None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:300]


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


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory's entries: renames into it) by its path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
