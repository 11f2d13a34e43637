"""Train on a task of your own: register a reward and a task from a script, then run a shipped recipe on it.

    .venv/bin/python examples/custom_task.py                                  # GRPO, tiny model, CPU
    .venv/bin/python examples/custom_task.py grpo/tiny_cpu_fp8 grpo.steps=5 run.name=quick
    .venv/bin/python examples/custom_task.py ppo/tiny_cpu_fp8 run.name=ppo-addition
    .venv/bin/torchrun --nproc_per_node 2 examples/custom_task.py grpo/tiny_cpu_fsdp2   # 2 ranks, FSDP2

A config names tasks only by their registered name (`task.name: addition`),
never by a code path, so the code lives here: this script registers it, then
hands the command line to `rlsync run` in the same process (the registry is
per process; under a launcher, launch this script, not `rlsync run`). The
first argument, if it has no `=`, is the config (a file or a shipped name);
the others are `key=value` overrides.

Reward functions take trl's form: keyword lists `prompts`, `completions` and
one per record column (here `answer`), returning one float per completion;
the same function can go into trl's `GRPOTrainer(reward_funcs=...)`.
"""

from __future__ import annotations

import random
import sys
from typing import Any

from rlsync.cli import main
from rlsync.rl.tasks import TaskConfig, register_reward, register_task


@register_reward("brevity")
def brevity(completions: list[str], **kwargs: Any) -> list[float]:
    """A small bonus for short completions: 0.1 for an empty one, down to 0 at 12 characters."""
    return [0.1 * max(0.0, 1.0 - len(c) / 12) for c in completions]


def addition(rng: random.Random, config: TaskConfig) -> dict[str, str]:
    """One record: a two-number sum as the prompt (at most 6 characters, the tiny configs' task.prompt_length),
    and its value in the `answer` column that the built-in `math` reward (math-verify) checks."""
    a, b = rng.randint(1, 50), rng.randint(1, 50)
    return {"prompt": f"{a}+{b}=", "answer": str(a + b)}


register_task("addition", generate=addition, rewards=["math", "brevity"], success="math",
              description="two-number sums; math-verify checks the answer, short completions get a bonus")

if __name__ == "__main__":
    args = sys.argv[1:]
    config = args.pop(0) if args and "=" not in args[0] else "grpo/tiny_cpu_fp8"
    sys.exit(main(["run", config, "task.name=addition", "run.name=addition", *args]))
