"""Groups that say which runs of their tensors are slices of one tensor (an MoE layer's experts).

Why: a checkpoint names every expert's projection on its own, so a layer of
256 experts arrives as 768 `(name, tensor)` pairs, while the trainer holds
them as three fused tensors and the engine writes them into three fused
tensors. Handled one pair at a time, a sync's cost grows with the number of
tensors instead of their bytes (about 20 us of Python per pair). A
`StackedGroup` is still the plain sequence of pairs every consumer iterates
(vLLM's `load_weights`, verify, any user code); it also carries `stacks`, so
a consumer that can take a run of experts as one tensor (the engine's
replayed sync plan) does one check and one write per run.

What it guarantees: for every `Stack` `s`, the items `s.start + i` are
`(s.names[i], s.tensor[i])` (the same storage, shape, stride and offset) for
`i < len(s.names)`: the group makes those items itself from the stack's
tensor (one `unbind`), and it is a tuple, so neither can change afterwards.

Limitations:
1. Only slices along dim 0 of one tensor form a stack (transformers'
   `SplitModulelist` with `dim=0`, `convert._stack_split`); any other
   conversion yields plain pairs.
2. A consumer that rebuilds the group (`list(group)`, `group + [...]`) gets
   plain pairs and loses the stacks, which is always correct, only slower.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Sequence

import torch


@dataclasses.dataclass(frozen=True, slots=True, eq=False)
class Stack:
    """`len(names)` consecutive items of a group that are the slices `tensor[i]`."""

    names: tuple[str, ...]
    """Their checkpoint names, in order."""
    tensor: torch.Tensor
    """(len(names), ...): item `start + i` is `(names[i], tensor[i])`."""
    start: int = 0
    """Index of the first of them in the group (set by `StackedGroup`)."""

    @property
    def stop(self) -> int:
        return self.start + len(self.names)


class StackedGroup(tuple):
    """An immutable group of `(name, tensor)` pairs with its `stacks` (runs of slices of one tensor).

    Built from parts, each a pair or a `Stack`; a stack's pairs are made here from its tensor (one `unbind`),
    so they are its slices whoever builds the group.
    """

    stacks: tuple[Stack, ...]

    def __new__(cls, parts: Iterable[tuple[str, torch.Tensor] | Stack]) -> StackedGroup:
        items: list[tuple[str, torch.Tensor]] = []
        stacks: list[Stack] = []
        for part in parts:
            if isinstance(part, Stack):
                if part.tensor.dim() == 0 or part.tensor.shape[0] != len(part.names):
                    raise ValueError(f"a stack of {len(part.names)} names needs a tensor of {len(part.names)} slices "
                                     f"along dim 0, not shape {tuple(part.tensor.shape)}")
                stacks.append(Stack(part.names, part.tensor, len(items)))
                items += zip(part.names, part.tensor.unbind(0), strict=True)
            else:
                items.append(part)
        group = super().__new__(cls, items)
        group.stacks = tuple(stacks)
        return group


def stacks_of(group: Sequence[tuple[str, torch.Tensor]]) -> tuple[Stack, ...]:
    """The group's stacks (none for a plain sequence of pairs)."""
    return group.stacks if isinstance(group, StackedGroup) else ()


def segments(group: Sequence[tuple[str, torch.Tensor]]) -> Iterator[tuple[Sequence[tuple[str, torch.Tensor]], Stack | None]]:
    """The group in order as runs of pairs: `(pairs, None)` between stacks, `(its pairs, stack)` for each stack
    (empty runs left out; a plain sequence is one run)."""
    pos = 0
    for stack in stacks_of(group):
        if stack.start > pos:
            yield group[pos:stack.start], None
        yield group[stack.start:stack.stop], stack
        pos = stack.stop
    if pos < len(group) or not pos:
        yield (group[pos:] if pos else group), None
