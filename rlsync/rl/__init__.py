"""RL building blocks shared by the recipes: tasks, log-probs, losses, run directories.

Owns: tasks, GRPO / PPO math, rollouts, run directories, checkpoints and resume,
Hugging Face exports of a run's policy (`export`), plots, cross-section config checks. May import: `rlsync.engine` and everything
below it (never `rlsync.integrations` or the recipes).
"""
