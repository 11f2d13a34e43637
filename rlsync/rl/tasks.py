"""Tasks (prompts + rewards) by name: the registry configs choose from, and the task a recipe draws from.

A config names a registered task (`task.name: gsm8k`) and never code: a task
or reward of your own is registered from your script, which then runs a recipe
(docs/runs.md, "Tasks and rewards"; examples/custom_task.py):

    from rlsync.rl.tasks import register_reward, register_task

    @register_reward("brevity")
    def brevity(completions, **kwargs):            # trl's reward-function form
        return [1.0 / (1 + len(c)) for c in completions]

    register_task("countdown", records=my_records, rewards=["math", "brevity"], success="math")

Built in:
- `vowels`: random consonant prompts; reward = the share of vowels in the
  completion. The built-in tiny model is random, so this is a task it can
  learn from scratch on a CPU in minutes (random play ~0.08, learned ~1.0).
- `gsm8k`: math word problems in the GSM8K format through Hugging Face
  `datasets` (`task.dataset`: a hub name or a local file; null = the shipped
  sample), prompts through the tokenizer's chat template, answers checked by
  math-verify (`rlsync.rl.gsm8k`); logs `success`, the fraction correct.

A reward function takes `prompts` and `completions` (lists of text) and one
keyword list per record column (`answer=[...]`), and returns one float per
completion: the form trl's `reward_funcs` take, so one function serves rlsync's
recipes and trl's. A task's rewards are summed; `task.rewards` in a config
replaces them with other registered rewards.

A task's prompts come from `records` (a finite list: drawn in a shuffled order,
epoch after epoch) or `generate` (one record per call, from the task's random
generator). Each rank draws its own order (`make_task(config, seed=run seed +
rank)`), and `state_dict` holds where the draw is, so a resumed run draws what
an uninterrupted one would.

Limitations:
1. Rewards are sequence-level, computed on the trainer's rank 0..N each for its
   own prompts (no reward server, no per-token rewards).
2. A `records` task keeps every record in memory and filters them once, when
   the task is made, by `task.prompt_length`; a `generate` task's prompts are
   not length-checked (keep them within `task.prompt_length`).
3. Registrations live in the process that made them: under a launcher, launch
   your script (which registers and then runs), not `rlsync run`.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import random
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from rlsync.errors import ConfigError
from rlsync.rl.gsm8k import gsm8k_records, math_reward
from rlsync.rl.records import PromptRenderer

log = logging.getLogger(__name__)

RewardFunc = Callable[..., Sequence[float]]
"""`fn(prompts=[...], completions=[...], **columns) -> [float per completion]` (trl's reward-function form)."""

VOWELS = frozenset("aeiou")
_LETTERS = "bcdfghjklmnpqrstvwxyz"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclasses.dataclass(kw_only=True, slots=True)
class TaskConfig:
    """Which registered task to train on, and the data it reads."""

    name: str = "vowels"
    """A registered task: `vowels`, `gsm8k`, or one your script registered (`rlsync.rl.tasks.register_task`)."""
    prompt_length: int = 6
    """Prompt size bound: `vowels` draws prompts of this many characters; a dataset task (`gsm8k`) skips records
    whose prompt is longer than this many tokens after the chat template. `engine.max_model_len` must hold it plus
    the completion (checked)."""
    dataset: str | None = None
    """Dataset tasks: a Hugging Face dataset name (`openai/gsm8k`) or a local .jsonl / .json / .parquet file;
    null = the task's own default (gsm8k: the shipped sample, rlsync/data/gsm8k_sample.jsonl)."""
    dataset_config: str | None = None
    """The dataset's configuration name, where it has several (`main` for openai/gsm8k)."""
    split: str = "train"
    """The dataset split to draw prompts from."""
    rewards: list[str] = dataclasses.field(default_factory=list)
    """Registered reward names that replace the task's own rewards (summed); empty = the task's own."""

    def validate(self) -> None:
        spec = task_spec(self.name)
        if self.prompt_length < 1:
            raise ConfigError(f"task.prompt_length must be >= 1, got {self.prompt_length}")
        for name in self.rewards:
            reward_func(name, key="task.rewards")
        if spec.generate is not None:
            for key in ("dataset", "dataset_config"):
                if getattr(self, key) is not None:
                    raise ConfigError(f"task.{key}: the {self.name} task generates its prompts and reads no "
                                      f"dataset; leave task.{key} out")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class TaskSpec:
    """A registered task: where its prompts come from and how completions are scored."""

    name: str
    rewards: tuple[RewardFunc, ...]
    """Summed into the reward of each completion."""
    records: Callable[[TaskConfig], Iterable[Mapping[str, Any]]] | None = None
    """Reads the task's records (each a `prompt` and the columns its rewards read) from its config."""
    generate: Callable[[random.Random, TaskConfig], Mapping[str, Any]] | None = None
    """Makes one record from the task's random generator (instead of `records`)."""
    success: RewardFunc | None = None
    """1.0 for a right answer, 0.0 for a wrong one; its mean is logged as `success` each step."""
    description: str = ""


_TASKS: dict[str, TaskSpec] = {}
_REWARDS: dict[str, RewardFunc] = {}


def register_reward(name: str, func: RewardFunc | None = None, *, replace: bool = False):
    """Register reward `func` as `name` (a config's `task.rewards` may then name it); usable as a decorator.

    `ValueError` if `name` is taken (pass `replace=True` to replace it) or not a plain name.
    """
    def register(fn: RewardFunc) -> RewardFunc:
        _claim(_REWARDS, "reward", name, replace)
        if not callable(fn):
            raise TypeError(f"register_reward({name!r}): expected a function, got {type(fn).__name__}")
        _REWARDS[name] = fn
        return fn

    return register if func is None else register(func)


def register_task(name: str, *, rewards: Sequence[str | RewardFunc],
                  records: Callable[[TaskConfig], Iterable[Mapping[str, Any]]] | None = None,
                  generate: Callable[[random.Random, TaskConfig], Mapping[str, Any]] | None = None,
                  success: str | RewardFunc | None = None, description: str = "", replace: bool = False) -> TaskSpec:
    """Register a task as `name` (a config's `task.name` may then name it).

    Exactly one of `records` (a function of the `TaskConfig` returning the records) and `generate` (a function
    of a `random.Random` and the `TaskConfig` returning one record). `rewards` and `success` are functions or
    registered reward names. `ValueError` if `name` is taken (pass `replace=True`), a reward name is unknown,
    or neither or both of `records` and `generate` are given.
    """
    if (records is None) == (generate is None):
        raise ValueError(f"register_task({name!r}): give exactly one of records= and generate=")
    if not rewards:
        raise ValueError(f"register_task({name!r}): give at least one reward")
    funcs = tuple(reward_func(r) if isinstance(r, str) else r for r in rewards)
    check = reward_func(success) if isinstance(success, str) else success
    spec = TaskSpec(name=name, rewards=funcs, records=records, generate=generate, success=check,
                    description=description)
    _claim(_TASKS, "task", name, replace)
    _TASKS[name] = spec
    return spec


def _claim(table: dict[str, Any], kind: str, name: str, replace: bool) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"a {kind} name is letters, digits, '_', '.' and '-', got {name!r}")
    if name in table and not replace:
        raise ValueError(f"{kind} {name!r} is already registered; pick another name, or pass replace=True to "
                         f"replace it")


def registered_tasks() -> dict[str, str]:
    """Every registered task's name -> its description."""
    return {name: spec.description for name, spec in sorted(_TASKS.items())}


def registered_rewards() -> list[str]:
    return sorted(_REWARDS)


def task_spec(name: str, *, key: str = "task.name") -> TaskSpec:
    """The task registered as `name`; `ConfigError` naming `key` and every registered task otherwise."""
    if name not in _TASKS:
        raise ConfigError(_unknown(key, "task", name, _TASKS) + "; register your own with "
                          "rlsync.rl.tasks.register_task from your script (docs/runs.md, Tasks and rewards)")
    return _TASKS[name]


def reward_func(name: str, *, key: str = "reward") -> RewardFunc:
    """The reward registered as `name`; `ConfigError` naming `key` and every registered reward otherwise."""
    if name not in _REWARDS:
        raise ConfigError(_unknown(key, "reward", name, _REWARDS) + "; register your own with "
                          "rlsync.rl.tasks.register_reward")
    return _REWARDS[name]


def _unknown(key: str, kind: str, name: str, table: Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(str(name), list(table), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{key}: {name!r} is not a registered {kind}{hint}; registered: {', '.join(sorted(table))}"


class Prompt(str):
    """A prompt's text (what the engine continues) that carries its record (the columns rewards read)."""

    record: Mapping[str, Any]

    def __new__(cls, text: str, record: Mapping[str, Any]) -> Prompt:
        prompt = super().__new__(cls, text)
        prompt.record = record
        return prompt


class Task:
    """Draws a registered task's prompts for one rank and scores completions with its rewards."""

    def __init__(self, spec: TaskSpec, config: TaskConfig, seed: int, tokenizer: Any = None) -> None:
        self.spec, self.config, self.seed = spec, config, seed
        self.reward_funcs = tuple(reward_func(n, key="task.rewards") for n in config.rewards) or spec.rewards
        self.rng = random.Random(seed)
        self._last: dict[str, float] = {}
        self._render = PromptRenderer(tokenizer) if tokenizer is not None else None
        self._pool: list[Prompt] = []
        if spec.records is not None:
            if tokenizer is None:
                raise ValueError(f"task {spec.name!r} reads records: make_task needs the tokenizer")
            self._pool = self._load()
            self.epoch, self.position = 0, 0
            self._order = self._shuffled(0)

    def _load(self) -> list[Prompt]:
        records = list(self.spec.records(self.config))
        texts = [self._render(r["prompt"]) for r in records]
        lengths = [len(ids) for ids in self._render.tokenizer(texts)["input_ids"]] if texts else []
        pool = [Prompt(t, r) for t, r, n in zip(texts, records, lengths, strict=True) if n <= self.config.prompt_length]
        how = "the tokenizer's chat template" if self._render.templated else "plain (the tokenizer has no chat template)"
        log.info(f"task {self.spec.name}: {len(pool)} of {len(records)} records, {len(records) - len(pool)} skipped as "
                 f"longer than task.prompt_length={self.config.prompt_length} tokens; prompts: {how}")
        if not pool:
            longest = max(lengths, default=0)
            raise ConfigError(f"task.prompt_length: no prompt of task {self.spec.name} fits in "
                              f"{self.config.prompt_length} tokens ({len(records)} records, the shortest "
                              f"{min(lengths, default=0)}, the longest {longest}); raise task.prompt_length (and "
                              f"engine.max_model_len)")
        return pool

    def _shuffled(self, epoch: int) -> list[int]:
        order = list(range(len(self._pool)))
        random.Random(f"{self.seed}/{epoch}").shuffle(order)
        return order

    def prompts(self, num: int) -> list[Prompt]:
        """The next `num` prompts of this rank's draw."""
        if self.spec.generate is not None:
            out = []
            for _ in range(num):
                record = self.spec.generate(self.rng, self.config)
                prompt = record["prompt"]
                if self._render is None and not isinstance(prompt, str):
                    raise ValueError(f"task {self.spec.name!r} generates conversations: make_task needs the tokenizer")
                out.append(Prompt(prompt if self._render is None else self._render(prompt), record))
            return out
        out = []
        for _ in range(num):
            if self.position == len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._shuffled(self.epoch)
            out.append(self._pool[self._order[self.position]])
            self.position += 1
        return out

    def rewards(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> list[float]:
        """One reward per completion (`prompts[i]` is the prompt `completions[i]` answers): the rewards' sum."""
        columns: dict[str, list[Any]] = {}
        for key in {k for p in prompts for k in p.record} - {"prompt"}:
            columns[key] = [p.record.get(key) for p in prompts]
        texts = [str(p) for p in prompts]
        scores: dict[RewardFunc, list[float]] = {}
        for fn in dict.fromkeys([*self.reward_funcs, *([self.spec.success] if self.spec.success else [])]):
            values = [float(v) for v in fn(prompts=texts, completions=list(completions), **columns)]
            if len(values) != len(completions):
                raise ValueError(f"reward {getattr(fn, '__name__', fn)!r} returned {len(values)} values for "
                                 f"{len(completions)} completions")
            scores[fn] = values
        self._last = {}
        if self.spec.success is not None and completions:
            self._last["success"] = sum(scores[self.spec.success]) / len(completions)
        return [sum(vals) for vals in zip(*(scores[fn] for fn in self.reward_funcs), strict=True)]

    def step_metrics(self) -> dict[str, float]:
        """Metrics of the last `rewards` call: `success` (the fraction right) for a task that can tell."""
        return dict(self._last)

    def records(self, num: int) -> list[dict[str, Any]]:
        """The next `num` records with the prompt as text, for a trl dataset (its reward functions get the rest)."""
        return [{**p.record, "prompt": str(p)} for p in self.prompts(num)]

    def state_dict(self) -> dict:
        """Where this rank's draw is (plain data: checkpoints load with `weights_only=True`)."""
        if self.spec.generate is not None:
            return {"rng": self.rng.getstate()}
        return {"epoch": self.epoch, "position": self.position, "num_records": len(self._pool)}

    def load_state_dict(self, state: dict) -> None:
        if self.spec.generate is not None:
            version, internal, gauss = state["rng"]
            self.rng.setstate((version, tuple(internal), gauss))
            return
        if state.get("num_records") != len(self._pool):
            raise ConfigError(f"resume: task {self.spec.name} now has {len(self._pool)} prompts, the checkpoint "
                              f"drew from {state.get('num_records')}; the dataset or task.prompt_length changed")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._shuffled(self.epoch)


def make_task(config: TaskConfig, seed: int, *, tokenizer: Any = None) -> Task:
    """The task `config.name` names, drawing with `seed` (recipes pass run seed + rank); `tokenizer` renders
    conversations and bounds prompt lengths (required by tasks that read records)."""
    return Task(task_spec(config.name), config, seed, tokenizer)


# ---- built-in rewards and tasks ---------------------------------------------------------------------------


def vowel_share(completions: Sequence[str], **_: Any) -> list[float]:
    """The share of each completion's characters that are vowels (0.0 for an empty one)."""
    return [sum(ch in VOWELS for ch in c) / len(c) if c else 0.0 for c in completions]


def _consonants(rng: random.Random, config: TaskConfig) -> dict[str, str]:
    return {"prompt": "".join(rng.choice(_LETTERS) for _ in range(config.prompt_length)) + ":"}


def _gsm8k(config: TaskConfig) -> list[dict[str, Any]]:
    return gsm8k_records(config.dataset, config_name=config.dataset_config, split=config.split)


register_reward("vowels", vowel_share)
register_reward("math", math_reward)
register_task("vowels", generate=_consonants, rewards=["vowels"],
              description="reward = the share of vowels in the completion (learnable by the random tiny model)")
register_task("gsm8k", records=_gsm8k, rewards=["math"], success="math",
              description="GSM8K-format math word problems; reward 1 when math-verify finds the answer right")
