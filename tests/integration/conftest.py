"""Engines shared per test module (building one costs a few seconds)."""

import random

import pytest

from rlsync.source import ModuleSource, WeightSource

pytestmark = pytest.mark.integration


def make_engine(tiny_path, **kwargs):
    from rlsync.engine import VLLMEngine

    return VLLMEngine(tiny_path, **kwargs)


class ShuffledSource(WeightSource):
    """Every tensor of `model` in a seeded random order, regrouped in random sizes of 1..`max_group`
    (layers split apart): the worst order a source could feed a reload."""

    def __init__(self, model, seed, max_group=4):
        super().__init__()
        self.inner, self.seed, self.max_group = ModuleSource(model), seed, max_group

    def metadata(self):
        return self.inner.metadata()

    def groups(self):
        flat = [t for g in self.inner.groups() for t in g]
        rng = random.Random(self.seed)
        rng.shuffle(flat)
        while flat:
            k = rng.randint(1, self.max_group)
            yield flat[:k]
            flat = flat[k:]
