"""Rollouts from a tensor-parallel engine: every rank of the group submits the group's prompts, keeps its own.

vLLM's `external_launcher` needs identical requests on every rank of a TP group. `rollout.collect` gathers the
group's prompts (with each rank's own step seed), generates them all, and keeps the completions of the rank's own
prompts, so each rank trains on its own samples (none duplicated) drawn as a one-rank engine would draw them.
The real TP-2 engine runs in tests/distributed/test_tensor_parallel.py.
"""

import torch

from rlsync.default_model import build_tokenizer
from rlsync.engine import Completion, PromptResult
from rlsync.rl.rollout import collect
from rlsync.rl.state import step_seed
from rlsync.rl.tasks import TaskConfig, make_task


class GroupEngine:
    """Rank `tp_rank` of a 2-rank group whose other rank drew `other` prompts with seed `other_seed`."""

    def __init__(self, tp_rank, other, other_seed):
        self.tp_rank, self.other, self.other_seed = tp_rank, other, other_seed
        self.calls = []

    def gather_in_group(self, obj):
        theirs = (self.other, self.other_seed)
        return [obj, theirs] if self.tp_rank == 0 else [theirs, obj]

    def generate(self, prompts, *, n, seed, **_):
        self.calls.append((list(prompts), list(seed)))
        return [PromptResult(prompt_token_ids=list(p), completions=[
            Completion(token_ids=[4 + (s % 50), 5], logprobs=[-1.0, -1.0], text="ae") for _ in range(n)])
            for p, s in zip(prompts, seed)]


def test_each_rank_keeps_its_own_prompts_and_seed():
    tok = build_tokenizer()
    other = [[9, 9, 9], [8, 8]]
    for rank in (0, 1):
        task = make_task(TaskConfig(), seed=rank)
        engine = GroupEngine(rank, other, other_seed=12345)
        rollout = collect(engine, task, tok, num_prompts=3, n=2, max_tokens=4, temperature=1.0, seed=7, step=3)
        (prompts, seeds), = engine.calls
        mine = [tok(p)["input_ids"] for p in make_task(TaskConfig(), seed=rank).prompts(3)]
        assert prompts == (mine + other if rank == 0 else other + mine)  # one request list for the whole group
        assert seeds == ([step_seed(7, 3)] * 3 + [12345] * 2 if rank == 0 else [12345] * 2 + [step_seed(7, 3)] * 3)
        assert rollout.batch.input_ids.shape[0] == 3 * 2  # only this rank's samples are trained on
        assert torch.equal(rollout.batch.input_ids[0, :len(mine[0])], torch.tensor(mine[0]))
