"""Prompt records for the tasks: read through Hugging Face `datasets`, rendered by the tokenizer's chat template.

A record is a mapping with a `prompt` and any other columns its rewards read
(trl's dataset convention, so one reward function serves both): `prompt` is
either text, used as it is, or a conversation (a list of `{"role", "content"}`
messages), which `PromptRenderer` turns into the text the engine continues:
the tokenizer's chat template with the generation prompt added.

`load_records` reads a dataset by name from the Hugging Face hub (or its cache:
`datasets` honours `HF_HUB_OFFLINE` / `HF_DATASETS_OFFLINE` and `HF_HOME`), a
dataset directory, or one local `.jsonl` / `.json` / `.parquet` / `.csv` file.

Limitations:
1. A tokenizer without a chat template (the built-in tiny model's) gets a
   conversation as its messages' contents joined by blank lines, the plain
   prompt a base model continues; `PromptRenderer.templated` says which, and
   the task logs it.
2. The recipes tokenize a prompt's text with the tokenizer's special tokens
   (`rlsync.rl.rollout.collect`); where the tokenizer adds a BOS token itself
   and the template writes one too, the renderer drops the template's, so the
   engine sees the token ids the template means, not two BOS tokens.
3. The whole split is read into memory; a dataset too large for that wants a
   task of its own (`rlsync.rl.tasks.register_task` with a generator).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from rlsync.errors import ConfigError

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
"""Local file suffix -> the `datasets` builder that reads it."""


def load_records(dataset: str, *, config_name: str | None, split: str) -> Sequence[Mapping[str, Any]]:
    """The `split` of `dataset` (a hub name, a dataset directory or a local file) as a `datasets.Dataset`.

    Errors are `ConfigError`s naming `task.dataset` (or `task.dataset_config`) with `datasets`' reason.
    """
    import datasets

    path = Path(dataset).expanduser()
    if not path.exists() and (path.suffix.lower() in FILE_BUILDERS or dataset.startswith(("/", ".", "~"))):
        raise ConfigError(f"task.dataset: {dataset}: no such file (a local file must exist; a dataset on the "
                          f"Hugging Face hub is named org/name)")
    if path.is_file():
        builder = FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ConfigError(f"task.dataset: {dataset} is a file rlsync cannot read; use one of "
                              f"{', '.join(FILE_BUILDERS)} (or a dataset name on the Hugging Face hub)")
        if config_name is not None:
            raise ConfigError(f"task.dataset_config: {config_name!r} names a configuration, but {dataset} is one "
                              f"file, which has none; leave task.dataset_config out")
        args, kwargs = (builder,), {"data_files": {split: str(path)}, "split": split}
        quiet = _no_progress_bars()  # "Generating train split" for a local file is noise on the terminal
    else:
        args, kwargs = (dataset, config_name), {"split": split}
        quiet = contextlib.nullcontext()  # a download's progress is worth seeing
    try:
        with quiet:
            return datasets.load_dataset(*args, **kwargs)
    except (datasets.exceptions.DatasetsError, OSError, ValueError) as exc:
        where = f"{dataset}" + (f" (config {config_name})" if config_name else "") + f", split {split!r}"
        raise ConfigError(f"task.dataset: cannot read {where}: {type(exc).__name__}: {exc}") from exc


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


class PromptRenderer:
    """A record's `prompt` -> the text the engine continues, through one tokenizer's chat template."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.templated = bool(getattr(tokenizer, "chat_template", None))
        """Conversations go through the tokenizer's chat template (else: plain prompts, see Limitation 1)."""
        bos = tokenizer.bos_token
        self._bos_to_drop = bos if bos and tokenizer("")["input_ids"][:1] == [tokenizer.bos_token_id] else None

    def __call__(self, prompt: Any) -> str:
        if isinstance(prompt, str):
            return prompt
        messages = check_conversation(prompt)
        if not self.templated:
            return "\n\n".join(m["content"] for m in messages)
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if self._bos_to_drop and text.startswith(self._bos_to_drop):
            text = text[len(self._bos_to_drop):]  # the tokenizer adds it again (Limitation 2)
        return text


def check_conversation(prompt: Any) -> list[Mapping[str, str]]:
    """`prompt` as a list of messages; `ValueError` saying what a record's prompt must be otherwise."""
    if (isinstance(prompt, Sequence) and prompt
            and all(isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in prompt)):
        return list(prompt)
    raise ValueError(f"a record's prompt must be text or a list of {{'role': ..., 'content': ...}} messages, "
                     f"got {str(prompt)[:80]!r}")
