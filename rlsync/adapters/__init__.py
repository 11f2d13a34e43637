"""The ground floor: the only code that touches vLLM's and trl's internals.

Owns: every access to vLLM internals (`vllm_engine`: version check, building
the in-process `vllm.LLM`, reaching its model, sampling, sleep; `vllm_load`:
the capture hook, weight loaders, vLLM's layerwise reload, its checkpoint
iterator; `vllm_layers`: processed layers, derived state, tied heads, vLLM's
quant-method types; `vllm_quant`: the classes and FP8 kernels the `rlsync_fp8`
plugin builds on) and to trl internals (`trl`: version check, the colocate
hooks). Public vLLM API (`vllm.LLM`, `SamplingParams`) is reached through here
too, so no other rlsync package imports vLLM.
May import: `rlsync.errors` only (import-linter checks it). Importing this
package imports neither vLLM nor trl; each function imports what it touches.
"""
