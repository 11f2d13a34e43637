"""The math task's data and reward: GSM8K-format records, answers checked by `math-verify`.

GSM8K format: each record has a `question` and an `answer`, a worked solution
whose last line is `#### <number>` (`openai/gsm8k`, config `main`, and any
dataset or file laid out the same way). `gsm8k_records` turns each into a task
record: a one-message conversation (the question and `INSTRUCTION`) as its
`prompt` and the number after `####` as its `answer`. `math_reward` scores a
completion 1.0 when `math_verify.verify` finds its answer equal to that number
(`\\boxed{72}`, `#### 72`, `72.0`, `\\frac{144}{2}` all count), else 0.0: the
answer extraction and comparison are math-verify's, not a parser of ours.

The package ships `SAMPLE`, 128 generated problems in this format
(scripts/make_gsm8k_sample.py), so the task runs and is tested offline; a
config with `task.dataset: null` reads it.

Limitations:
1. math-verify bounds each parse and comparison with a SIGALRM timeout, which
   Python allows on the main thread only; elsewhere (a reward called from a
   worker thread) it runs without one.
2. The answer math-verify takes from a completion is its first match in
   math-verify's priority order (a `\\boxed{}` first, then the last number
   ...), as math-verify documents; a completion that states two answers is
   judged by that one.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlsync.errors import ConfigError
from rlsync.rl.records import load_records

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "gsm8k_sample.jsonl"
"""The shipped sample: 128 generated arithmetic word problems in the GSM8K format."""
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
"""Appended to each question (Qwen2.5's math prompt; `math_reward` also accepts `#### N` and a bare last number)."""
MARKER = "####"


def final_answer(answer: str) -> str:
    """The number after a GSM8K answer's last `####`, thousands separators removed; `ValueError` if there is none."""
    _, marker, tail = answer.rpartition(MARKER)
    number = tail.strip().replace(",", "")
    if not marker or not number:
        raise ValueError(f"a GSM8K answer ends in '{MARKER} <number>'; this one does not: {answer[-80:]!r}")
    return number


def gsm8k_records(dataset: str | None, *, config_name: str | None, split: str) -> list[dict[str, Any]]:
    """Task records from a GSM8K-format dataset (`SAMPLE` when `dataset` is None): prompt + final answer."""
    table = load_records(str(SAMPLE) if dataset is None else dataset, config_name=config_name, split=split)
    missing = {"question", "answer"} - set(table.column_names)
    if missing:
        raise ConfigError(f"task.dataset: {dataset or SAMPLE} is not in the GSM8K format: no "
                          f"{' or '.join(sorted(missing))} column (it has {', '.join(table.column_names)})")
    records = []
    for i, row in enumerate(table):
        try:
            answer = final_answer(str(row["answer"]))
        except ValueError as exc:
            raise ConfigError(f"task.dataset: record {i} of {dataset or SAMPLE}: {exc}") from exc
        content = f"{row['question'].strip()}\n{INSTRUCTION}"
        records.append({"prompt": [{"role": "user", "content": content}], "answer": answer})
    return records


def math_reward(completions: Sequence[Any], answer: Sequence[str], **_: Any) -> list[float]:
    """1.0 for each completion whose answer math-verify finds equal to `answer` (the record's number), else 0.0.

    A reward function in trl's form (`completions` and the dataset's columns as keyword lists); a conversational
    completion (a list of messages, as trl passes for chat datasets) is judged by its last message.
    """
    from math_verify import parse, verify

    timeout = 5 if threading.current_thread() is threading.main_thread() else None  # Limitation 1
    scores = []
    for completion, gold in zip(completions, answer, strict=True):
        text = completion[-1]["content"] if isinstance(completion, list) else completion
        found = parse(text, parsing_timeout=timeout)
        scores.append(1.0 if found and verify(_gold(gold, timeout), found, timeout_seconds=timeout) else 0.0)
    return scores


@functools.lru_cache(maxsize=4096)
def _gold(answer: str, timeout: int | None) -> list[Any]:
    from math_verify import parse

    gold = parse(answer, parsing_timeout=timeout)
    if not gold:
        raise ValueError(f"math-verify cannot read the reference answer {answer!r}")
    return gold
