"""Resume and periodic checkpoints for a recipe's loop, in two calls.

    if cfg.resume and is_complete(run, steps, key="grpo.steps"):
        return                                  # says so; no engine is built
    ckpt = Checkpointer(run, cfg.run, state)
    start = ckpt.resume(engine, source) if cfg.resume else ckpt.start()
    for step in range(start + 1, steps + 1):
        ...
        ckpt.maybe_save(step, final=step == steps)

Why the engine is part of resume: the engine loads the base checkpoint from
disk when it is built, so after restoring the policy it must be synced with
the restored weights *before* the first rollout, or step k+1 would sample from
the base model. `resume` does that sync (tagged with the checkpoint's step).

On resume, metric lines after the checkpoint's step are dropped (they are
recomputed), TensorBoard events from that step on are purged (trackers:
`rlsync.rl.tracking`), and stale
`.tmp-*` directories of interrupted writes are removed. Both the resume and the
check for a finished run say on the `rlsync` logger which checkpoint and step
they found, so a resume is never silent. The checkpoint is the
newest *intact* one (`checkpoint.load_latest`: every file's sha256 checked,
weights-only load, damaged ones skipped with a warning); a `latest` pointer or
checkpoint path outside the run directory stops the resume (`CheckpointError`).

Limitations:
1. Rank 0 writes the checkpoint (`state_dict` is still called on every rank,
   since it is collective when distributed).
2. A resume with no checkpoint yet starts from step 0 with a warning, so a
   preemptible job can always pass `resume=true`.
3. `is_complete` trusts a checkpoint whose files match their manifest; one that
   matches but does not load (a crafted `state.pt`) would be taken as the end of
   the run, where a resume would skip it (`checkpoint.find_intact`).
"""

from __future__ import annotations

import logging
import shutil

import torch.distributed as dist

from rlsync.rl import checkpoint
from rlsync.rl.state import is_distributed
from rlsync.rl.run import RunConfig, RunDir
from rlsync.rl.state import TrainState

log = logging.getLogger(__name__)


def is_rank0() -> bool:
    return not is_distributed() or dist.get_rank() == 0


def is_complete(run: RunDir, steps: int, *, key: str) -> bool:
    """True, and says so, if the run's newest intact checkpoint is at step `steps` (config key `key`) or later.

    Reads only the checkpoint's manifest and hashes, so a finished run exits before a model or engine is built.
    """
    path = checkpoint.find_intact(run.path)
    if path is None or checkpoint.checkpoint_step(path) < steps:
        return False
    step = checkpoint.checkpoint_step(path)
    log.info(f"resume: {run.path} is already complete: its checkpoint {path} is at step {step} and {key} is "
             f"{steps}; nothing to run (raise {key} to continue the run)")
    return True


class Checkpointer:
    """Saves `state` every `config.checkpoint_every` steps into `run`, and restores the newest."""

    def __init__(self, run: RunDir, config: RunConfig, state: TrainState) -> None:
        self.run = run
        self.config = config
        self.state = state
        self.saved_step: int | None = None

    def start(self) -> int:
        """A fresh run: step 0 (the engine already holds the base weights)."""
        self.run.open_trackers()
        return 0

    def resume(self, engine, source) -> int:
        """Load the newest complete checkpoint, sync it into `engine`; returns its step (0 if none)."""
        root = checkpoint.checkpoint_dir(self.run.path)
        if is_rank0() and root.is_dir():
            for partial in root.glob(".tmp-*"):
                shutil.rmtree(partial)
        if is_distributed():
            dist.barrier()
        latest = checkpoint.load_latest(self.run.path)
        if latest is None:
            log.warning(f"resume=true but {root} holds no complete checkpoint; starting from step 0")
            self.run.truncate_after(0)
            return self.start()
        step = self.state.load_state_dict(latest[1])
        log.info(f"resume: continuing {self.run.path} from checkpoint {latest[0]} (step {step})")
        self.run.truncate_after(step)
        self.run.open_trackers(purge_step=step + 1)
        engine.sync(source, step=step)
        self.saved_step = step
        return step

    def maybe_save(self, step: int, *, final: bool = False) -> bool:
        """Save at every `checkpoint_every`-th step and at the final one; True if saved."""
        every = self.config.checkpoint_every
        if every <= 0 or not (step % every == 0 or final) or step == self.saved_step:
            return False
        state = self.state.state_dict(step)
        if is_rank0():
            checkpoint.save_checkpoint(self.run.path, step, state, keep=self.config.keep_checkpoints)
        if is_distributed():
            dist.barrier()
        self.saved_step = step
        return True
