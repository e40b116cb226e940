"""Rollout engines for the generation-server tests (tests/test_async.py): the transformers engine,
slowed down or made bulky, run inside `urlvr serve` as `rollout.engine.backend`. The recipe's
`plugins: [engine_plugins]` makes the server import this module too."""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from typing import Literal

import torch
from pydantic import Field

from urlvr.rollout.base import ROLLOUT_ENGINES
from urlvr.rollout.transformers_engine import TransformersEngineSection, TransformersRolloutEngine


class SlowEngineSection(TransformersEngineSection):
    name: Literal["test_slow"] = "test_slow"  # type: ignore[assignment]
    delay_s: float = Field(0.0, ge=0)
    """Seconds each generate sleeps before sampling (a server busy with a long generation)."""
    text_bytes: int = Field(0, ge=0)
    """Characters of padding appended to every sample's text (an answer larger than the socket buffers)."""
    load_delay_s: float = Field(0.0, ge=0)
    """Seconds a weight sync sleeps per tensor it loads (a sync in progress, for several buckets)."""


@ROLLOUT_ENGINES.register("test_slow")
class SlowEngine(TransformersRolloutEngine):
    settings = SlowEngineSection

    @classmethod
    def from_recipe(cls, recipe, model, tokenizer, dist) -> SlowEngine:
        options: SlowEngineSection = recipe.rollout.engine
        engine = cls(model, tokenizer, generation_batch_size=options.generation_batch_size)
        engine.delay_s, engine.text_bytes, engine.load_delay_s = options.delay_s, options.text_bytes, options.load_delay_s
        return engine

    def load_weights(self, weights) -> None:
        """What `urlvr serve` calls with each sync's (name, tensor) pairs, as they arrive."""
        params = dict(self.model.named_parameters(remove_duplicate=False))
        with torch.no_grad():
            for name, tensor in weights:
                time.sleep(self.load_delay_s)
                params[name].copy_(tensor)

    def generate(self, prompts, group_size, sampling):
        print(f"test_slow: generating for {self.delay_s} s", file=sys.stderr, flush=True)  # to the server's log
        time.sleep(self.delay_s)
        groups = super().generate(prompts, group_size, sampling)
        pad = " " * self.text_bytes
        return [replace(g, samples=tuple(replace(s, text=s.text + pad) for s in g.samples)) for g in groups]
