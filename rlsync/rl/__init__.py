"""RL building blocks shared by the recipes: tasks, log-probs, losses, run directories."""
