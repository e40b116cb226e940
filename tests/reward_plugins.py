"""Rewards used by the training tests, loaded through the recipe's `plugins` (as users do).

A random-init model never writes `\\boxed{}`, so majority vote would give all-zero rewards and
zero gradients; these give every group a spread of rewards so updates actually move weights.
"""

import json
import os
from pathlib import Path

from urlvr.rewards.base import reward

SEEN_GROUPS: list[tuple[str, int, int]] = []  # (prompt_id, group size, distinct prompts seen in the call)
SEEN_GROUPS_DIR_ENV = "URLVR_TEST_SEEN_GROUPS_DIR"  # set: each rank also appends to <dir>/rank<RANK>.jsonl


@reward("test_short_response")
def short_response(group, ctx, *, budget: float = 12.0):
    """1 - len/budget: prefers short responses (varies within every group)."""
    SEEN_GROUPS.append((group.prompt.prompt_id, group.size, len({id(group.prompt)})))
    if os.environ.get(SEEN_GROUPS_DIR_ENV):  # multi-process tests read what every rank saw
        seen = {"prompt_id": group.prompt.prompt_id, "lengths": [len(s.token_ids) for s in group.samples]}
        with open(Path(os.environ[SEEN_GROUPS_DIR_ENV]) / f"rank{os.environ.get('RANK', '0')}.jsonl", "a") as f:
            f.write(json.dumps(seen) + "\n")
    return [1.0 - len(s.token_ids) / budget for s in group.samples]


@reward("test_peeks_at_label")
def peeks_at_label(group, ctx):
    """Illegal: reads the label without needs_label=True."""
    return [float(ctx.label is not None)] * group.size


@reward("test_first_token")
def first_token(group, ctx):
    """The first response token's id / 64: varies within groups whatever the lengths."""
    return [s.token_ids[0] / 64 if s.token_ids else 0.0 for s in group.samples]
