"""The vote-based zoo (issue 23): `urlvr rewards NAME` makes every reward's knobs discoverable,
and the zoo recipes that are exact compositions of existing parts (SRT, CuMa's masking) say so,
carry their paper's settings and run two CPU steps on the embedded tiny model."""

from __future__ import annotations

import inspect

import pytest

from urlvr.cli import main
import urlvr.builtins  # noqa: F401
from urlvr.rewards.base import REWARDS, describe_reward, reward_knobs


# --------------------------------------------------------------------------- urlvr rewards NAME
def test_rewards_name_prints_the_whole_docstring_and_every_knob(capsys):
    assert main(["rewards", "majority_vote"]) == 0
    out = capsys.readouterr().out
    doc = inspect.cleandoc(REWARDS.get("majority_vote").fn.__doc__)
    assert doc in out  # the whole docstring, not its first line
    assert "min_majority_ratio  float  = 0.0" in out and "ties" in out and "'first'" in out


def test_every_registered_reward_lists_each_signature_knob_with_its_default():
    for name in REWARDS.names():
        spec = REWARDS.get(name)
        params = [p for p in list(inspect.signature(spec.fn).parameters.values())[2:]
                  if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
        knobs = reward_knobs(spec)
        assert [k[0] for k in knobs] == [p.name for p in params], name
        for (_, _, default), p in zip(knobs, params):
            assert default == ("required" if p.default is p.empty else repr(p.default)), name
        text = describe_reward(spec)
        assert text.startswith(name) and all(k[0] in text for k in knobs)


def test_rewards_name_refuses_an_unknown_name_in_one_line(capsys):
    assert main(["rewards", "majorty_vote"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did you mean 'majority_vote'" in err


def test_rewards_list_is_unchanged(capsys):
    assert main(["rewards"]) == 0
    lines = capsys.readouterr().out.splitlines()
    expected = [f"{n:24s} {'[oracle] ' if REWARDS.get(n).needs_label else ''}{REWARDS.get(n).description}"
                for n in REWARDS.names()]
    assert lines == expected
