"""The colocated vLLM engine (`VLLMEngine`), its config and its sync reports.

Owns: `VLLMEngine` (state machine, sync, generate, verify), `EngineConfig`
(every engine rule, checked in one place), `SyncReport`.
May import: `rlsync.reload`, `rlsync.source`, `rlsync.quant`, `rlsync.adapters`,
`rlsync.errors`. Imported by `rlsync.rl`, `rlsync.integrations`, the recipes.

Importing this package does not import vLLM; building an engine does.
"""

from rlsync.engine.config import LLM_KWARGS, EngineConfig
from rlsync.engine.engine import Completion, EngineState, PromptResult, VLLMEngine
from rlsync.engine.report import SyncReport

__all__ = ["LLM_KWARGS", "Completion", "EngineConfig", "EngineState", "PromptResult", "SyncReport", "VLLMEngine"]
