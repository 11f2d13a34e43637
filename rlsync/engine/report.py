"""`SyncReport`: what one sync did, in numbers a run can log."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(kw_only=True, slots=True)
class SyncReport:
    """Measurements of one completed sync."""

    step: int
    """Trainer step whose weights the engine now holds."""
    backend: str
    """Reload backend that ran (`rlsync` or `vllm`)."""
    seconds: float
    """Wall time from begin to commit (the source's gathers included)."""
    num_bytes: int
    """Bytes of tensors received from the source."""
    num_groups: int
    """Layer groups received."""
    num_tensors: int
    """Checkpoint tensors received."""
    peak_load_bytes: int | None = None
    """Most load-format bytes the reload backend held at once (its own counter)."""
    peak_gathered_bytes: int | None = None
    """Most gathered bytes the source held at once (its own counter)."""
    nonfinite_check_seconds: float = 0.0
    """Part of `seconds` spent checking for NaN / Inf (`reject_nonfinite`)."""
    planned: bool | None = None
    """rlsync backend with `sync_plan`: True when every group was replayed from the sync plan recorded on an
    earlier sync (no name mapping, no loader dispatch); False when some group went through vLLM's
    `load_weights` and was recorded (first sync, new names / shapes / dtypes, engine re-allocated, after a
    failed sync); None when the backend keeps no plan."""
    plan_note: str = ""
    """Why the sync recorded instead of replaying (empty when it replayed)."""
    verified: bool | None = None
    """With `verify=True`: every engine tensor the sync wrote was compared and equals the reference; else None."""
    num_verified: int = 0
    """Engine tensors compared bit for bit against the reference (equals `num_written` when verified)."""
    num_written: int = 0
    """With `verify=True`: engine tensors the sync wrote (every parameter of every module the checkpoint feeds)."""

    @property
    def gbps(self) -> float:
        """Received gigabytes per second."""
        return self.num_bytes / 1e9 / self.seconds if self.seconds > 0 else float("inf")

    def metrics(self, prefix: str = "sync/") -> dict[str, float]:
        """Flat numeric fields for a metrics logger."""
        out: dict[str, float] = {
            "seconds": self.seconds,
            "gbps": self.gbps,
            "bytes": float(self.num_bytes),
            "groups": float(self.num_groups),
        }
        if self.peak_load_bytes is not None:
            out["peak_load_bytes"] = float(self.peak_load_bytes)
        if self.peak_gathered_bytes is not None:
            out["peak_gathered_bytes"] = float(self.peak_gathered_bytes)
        if self.planned is not None:
            out["planned"] = float(self.planned)
        if self.verified is not None:
            out["verified"] = float(self.verified)
            out["verified_tensors"] = float(self.num_verified)
            out["written_tensors"] = float(self.num_written)
        return {prefix + k: v for k, v in out.items()}
