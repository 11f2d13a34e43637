"""Keep the ranks of a sharded trainer in step while they gather, and fail loudly.

Why: a source's gathers are collectives. If one rank raises (a bug, OOM, a
consumer rejecting a tensor) and stops iterating, the others would wait inside
the next collective until the trainer's process-group timeout (30 minutes by
default) and then die with an error that says nothing about the cause.

How: before every gather, all ranks run one tiny all-reduce of a failure flag
on a dedicated gloo group whose timeout is the source's `timeout_s` (a
"round"). A rank that fails writes its error to the job's c10d store under
`rlsync/lockstep/<session>/<rank>` and contributes a raised flag to the next
round, so the others raise `LockstepError` naming the failing rank, the group
and the original error. A rank whose own collective fails (its peer died)
looks in the store first, so its error names the peer's failure too.

Limitations:
1. A rank blocked inside the trainer's own collective (for instance in
   `full_tensor()` when the peer failed before reaching it) cannot be
   interrupted: it is released when the failing rank gives up its round after
   `timeout_s` and its process exits or tears down its process group. Launchers
   (torchrun, deepspeed) kill the remaining ranks when one exits, which may
   race with the error message.
2. Every rank must create its sources with the same `timeout_s` and call
   `groups()` the same number of times (the dedicated group is created
   collectively, once per timeout value, and rounds are counted).
3. After a `LockstepError` the process groups should be treated as broken;
   the error is meant to end the job with a clear message, not to be retried.
"""

from __future__ import annotations

import datetime
import itertools

import torch
import torch.distributed as dist

from rlsync.errors import SyncError

_GROUPS: dict[float, dist.ProcessGroup] = {}
_SESSIONS = itertools.count()


class LockstepError(SyncError):
    """Another rank failed or fell out of step while the ranks gathered weights."""


def distributed_world() -> int:
    """World size of the default process group, 1 when torch.distributed is not initialized."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _group(timeout_s: float) -> dist.ProcessGroup:
    group = _GROUPS.get(timeout_s)
    if group is None:
        group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
        _GROUPS[timeout_s] = group
    return group


class Lockstep:
    """Rounds of a failure flag, one per gather; see the module docstring."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.group = _group(timeout_s)
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.session = next(_SESSIONS)
        self.store = dist.distributed_c10d._get_default_store()
        self.failed = False

    def _key(self, rank: int) -> str:
        return f"rlsync/lockstep/{self.session}/{rank}"

    def peer_failures(self) -> list[str]:
        """Failure messages other ranks have published this session."""
        messages = []
        for rank in range(self.world):
            key = self._key(rank)
            if rank != self.rank and self.store.check([key]):
                messages.append(self.store.get(key).decode())
        return messages

    def _round(self, flag: float) -> float:
        value = torch.tensor([flag], dtype=torch.float32)
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.group)
        return float(value.item())

    def check(self, where: str) -> None:
        """Agree with every rank that nobody failed before gathering `where`."""
        try:
            failed = self._round(0.0) > 0
        except RuntimeError as exc:
            peers = self.peer_failures()
            detail = "; ".join(peers) if peers else "no rank reported an error (a rank stopped iterating or died)"
            raise LockstepError(
                f"rank {self.rank}: no answer from the other ranks within {self.timeout_s:g} s "
                f"before gathering {where}: {detail}"
            ) from exc
        if failed:
            peers = self.peer_failures()
            raise LockstepError(
                f"rank {self.rank} stopped before gathering {where}: "
                + ("; ".join(peers) if peers else "another rank failed without a message")
            )

    def fail(self, where: str, exc: BaseException) -> LockstepError | None:
        """Publish this rank's failure; returns an error naming a peer's earlier failure, if any.

        If a peer already reported (this rank's own error is then usually the
        collective breaking because that peer left), the peer's message is the
        cause worth reporting and no round is run. Otherwise this rank joins the
        next round with a raised flag (bounded by the timeout) so peers waiting
        at their check learn about it at once.
        """
        if self.failed:
            return None
        self.failed = True
        peers = self.peer_failures()
        message = f"rank {self.rank} failed during gather of {where}: {type(exc).__name__}: {exc}"
        self.store.set(self._key(self.rank), message)
        if peers:
            return LockstepError(f"rank {self.rank}: gather of {where} broke off because " + "; ".join(peers))
        try:
            self._round(1.0)
        except RuntimeError as round_exc:
            exc.add_note(
                f"rlsync: could not tell the other ranks within {self.timeout_s:g} s "
                f"(they are probably blocked in a trainer collective): {round_exc}"
            )
        return None
