"""Engines shared per test module (building one costs a few seconds)."""

import pytest

pytestmark = pytest.mark.integration


def make_engine(tiny_path, **kwargs):
    from rlsync.engine import VLLMEngine

    return VLLMEngine(tiny_path, **kwargs)
