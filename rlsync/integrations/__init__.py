"""Integrations with RL training libraries.

`rlsync.integrations.trl.RLSyncCallback` gives trl's `GRPOTrainer` and
`RLOOTrainer` FP8 colocated rollouts with layer-group weight sync. Importing
this package imports nothing heavy; importing `rlsync.integrations.trl`
imports trl and transformers (not vLLM).

Owns: the trl callback. May import: `rlsync.engine` and below; trl internals
only through `rlsync.adapters.trl`.
"""
