"""Project error types: what a user can get wrong or must react to.

`ValueError` subclasses are for bad input; `EngineNotReady` is for an engine
that refuses to sample because its weights are not from one complete sync;
`DivergenceError` stops a run whose loss or gradients stopped being finite;
`CheckpointError` refuses a checkpoint that cannot be trusted; `ExportError`
stops an export whose output would not match the base checkpoint.
"""


class RLSyncError(RuntimeError):
    """Base class for rlsync's runtime errors."""


class ConfigError(ValueError):
    """A configuration key, type or combination is invalid; the message names the key."""


class SyncError(RLSyncError):
    """A weight sync failed; the engine is left FAILED (it refuses to generate)."""


class NonFiniteError(SyncError):
    """A tensor of a sync holds NaN or Inf (`reject_nonfinite=True`); the engine is left FAILED."""

    def __init__(self, name: str) -> None:
        super().__init__(f"parameter {name!r} has non-finite values (NaN or Inf; reject_nonfinite=True)")
        self.name = name


class EngineNotReady(RLSyncError):
    """The engine's weights are not from one complete sync, so it refuses to sample."""


class DivergenceError(RLSyncError):
    """The loss or gradient norm became NaN or infinite; the run stops before the weights are touched."""


class CheckpointError(RLSyncError):
    """A checkpoint cannot be trusted: damaged, not loadable as plain data, or outside its run directory."""


class ExportError(RLSyncError):
    """An exported checkpoint does not match the base checkpoint's tensor names, shapes or dtypes; nothing is written."""
