"""The colocated vLLM engine (`VLLMEngine`) and its sync reports.

Importing this package does not import vLLM; building an engine does.
"""

from rlsync.engine.engine import Completion, EngineConfig, EngineState, PromptResult, VLLMEngine
from rlsync.engine.report import SyncReport

__all__ = ["Completion", "EngineConfig", "EngineState", "PromptResult", "SyncReport", "VLLMEngine"]
