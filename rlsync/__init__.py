"""rlsync: weight sync from an RL trainer into a colocated vLLM engine.

The trainer side (`rlsync.source`) yields one layer group of full tensors at a
time; the engine side (`rlsync.engine`) loads each group into vLLM, re-quantizing
to FP8 where the engine runs FP8, with memory bounded by one layer.

Importing this package stays lean on purpose: no vLLM, DeepSpeed or trl import
happens here (a test checks it). Heavy modules load on first use.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
