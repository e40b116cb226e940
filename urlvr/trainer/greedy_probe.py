"""The greedy probe of tracked prompts (`dynamics.greedy_every`): the trainer drives the engine,
`metrics.tracking` turns each greedy response into a row."""

from __future__ import annotations

from typing import Any

from urlvr.metrics.evaluation import judge_outcome
from urlvr.metrics.tracking import gather_rows, greedy_row


def greedy_rows(parts, recipe, dist, step: int) -> list[dict[str, Any]]:
    """Greedy-decode this rank's share of the tracked prompts; rows for every rank's share are
    gathered (every rank calls this: under ZeRO-3 generation is a collective)."""
    tracked = recipe.dynamics.track_prompts
    ids = sorted(parts.records) if tracked == "all" else [i for i in tracked if i in parts.records]
    mine = ids[dist.rank :: dist.world_size]
    sampling = parts.settings.greedy_sampling()
    with parts.generation_context():
        groups = parts.engine.generate([parts.prompts[i] for i in mine], 1, sampling) if mine else []
    extract = parts.settings.extract
    oracle = recipe.reward.oracle
    rows = []
    for prompt_id, group in zip(mine, groups, strict=True):
        sample, record = group.samples[0], parts.records[prompt_id]
        answer = parts.settings.answer(sample)
        correct = None
        if oracle is not None and record.label is not None:
            verdicts, timeouts = judge_outcome(group, record, [answer], extract, oracle, tokenizer=parts.tokenizer)
            correct = None if timeouts else verdicts[0]  # out of time: unknown, not wrong
        rows.append(greedy_row(step, prompt_id, sample, answer, correct))
    return gather_rows(rows)
