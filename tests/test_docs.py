"""Every ```python block in the README and docs runs (blocks tagged `python skip` are shown only)."""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_python_blocks_run(page):
    for code in BLOCK.findall(page.read_text()):
        exec(compile(code, str(page), "exec"), {"__name__": f"docs_{page.stem}"})


def test_documented_reward_works_on_a_group():
    import torch

    from urlvr.rewards.base import REWARDS, RewardContext
    from urlvr.rollout.base import Group, PromptInput, Sample

    if "boxed_and_short" not in REWARDS:
        test_python_blocks_run(REPO / "docs" / "writing-rewards.md")
    samples = tuple(Sample((1,) * n, (0.0,) * n, "t", "eos") for n in (3, 70))
    group = Group(PromptInput("p", "q", (1,)), samples)
    ctx = RewardContext(answers=("4", "4"), response_mask=torch.ones(2, 70), token_stats={}, extract_answer=str)
    assert REWARDS.get("boxed_and_short").fn(group, ctx, max_tokens=64) == [1.0, 0.0]
