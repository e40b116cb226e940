"""DAPO's parts (Yu et al. 2025, arXiv:2503.14476): the soft overlong punishment (Eq. 13), overlong
filtering (`algorithm.mask_truncated`), and dynamic sampling with refill (`rollout.dynamic_sampling`),
each checked against a float64 loop written from the paper, then in CPU runs."""

from __future__ import annotations

import pytest
import torch

import urlvr
from conftest import small_run_recipe
from urlvr.rewards.base import RewardContext, call_reward, check_reward_kwargs, REWARDS
from urlvr.rewards.length import overlong_penalty_scores
from urlvr.rollout.base import Group, Sample
from urlvr.data.records import PromptInput


def paper_overlong(length: int, l_max: int, l_cache: int) -> float:
    """DAPO Eq. 13, read off the paper."""
    if length <= l_max - l_cache:
        return 0.0
    if length <= l_max:
        return ((l_max - l_cache) - length) / l_cache
    return -1.0


def group_of(lengths, finish="eos") -> Group:
    samples = tuple(Sample(token_ids=tuple(range(n)), logprobs=(0.0,) * n, text="x" * n, finish_reason=finish)
                    for n in lengths)
    return Group(prompt=PromptInput("p", "q", (1, 2)), samples=samples)


@pytest.mark.parametrize(("l_max", "l_cache"), [(20480, 4096), (16, 4), (5, 5), (7, 1)])
def test_overlong_penalty_matches_the_paper(l_max, l_cache):
    lengths = list(range(0, l_max + 3)) if l_max < 100 else [0, 1, 16383, 16384, 16385, 18432, 20479, 20480, 20481]
    got = overlong_penalty_scores(lengths, max_length=l_max, cache=l_cache)
    for n, value in zip(lengths, got):
        assert value == pytest.approx(paper_overlong(n, l_max, l_cache), abs=1e-15), n
        assert -1.0 <= value <= 0.0
    if l_max >= 100:  # DAPO's own numbers: free up to 16384, -0.5 halfway through the cache, -1 at the cap
        assert got[lengths.index(16384)] == 0.0 and got[lengths.index(18432)] == -0.5 and got[lengths.index(20480)] == -1.0


def test_overlong_penalty_as_a_reward_term():
    spec = REWARDS.get("overlong_penalty")
    ctx = RewardContext.for_group([None] * 3, torch.ones(3, 8), extract_answer=lambda t: None)
    out = call_reward(spec, group_of([4, 7, 8]), ctx, {"max_length": 8, "cache": 4})
    assert list(out.scores) == [0.0, -0.75, -1.0]
    single = call_reward(spec, group_of([6]), RewardContext.for_group([None], torch.ones(1, 8), extract_answer=lambda t: None),
                         {"max_length": 8, "cache": 4})
    assert list(single.scores) == [-0.5]  # a group of one is scored like any other
    with pytest.raises(ValueError, match="needs max_length"):
        check_reward_kwargs("overlong_penalty", {"cache": 4})
    with pytest.raises(ValueError, match="cache must lie"):
        check_reward_kwargs("overlong_penalty", {"max_length": 8, "cache": 9})
    check_reward_kwargs("overlong_penalty", {"max_length": 8, "cache": 8})


@pytest.mark.parametrize("max_new_tokens, kwargs, inert", [
    (24, {"max_length": 64, "cache": 16}, True),   # responses <= 24 tokens, the ramp starts after 48
    (48, {"max_length": 64, "cache": 16}, True),   # exactly at the ramp's start: 0 for every length
    (49, {"max_length": 64, "cache": 16}, False),  # one token into the ramp
    (24, {"max_length": 24, "cache": 8}, False),   # the documented form, max_length = max_new_tokens
])
def test_an_overlong_penalty_no_response_can_reach_is_refused_at_load(max_new_tokens, kwargs, inert):
    from urlvr.recipe import load_recipe

    recipe = {"model": {"path": "urlvr/tiny"}, "rollout": {"max_new_tokens": max_new_tokens},
              "reward": {"terms": [{"name": "majority_vote"}, {"name": "overlong_penalty", "kwargs": kwargs}]}}
    if inert:
        with pytest.raises(ValueError, match=r"overlong_penalty: responses stop at rollout.max_new_tokens .* does nothing"):
            load_recipe(recipe)
        scores = overlong_penalty_scores(list(range(1, max_new_tokens + 1)), **kwargs)
        assert set(scores) == {0.0}  # the refusal's reason: every possible length scores 0
    else:
        load_recipe(recipe)


def test_without_truncated_zeroes_exactly_the_truncated_rows():
    from urlvr.rollout.collate import collate_groups
    from urlvr.trainer.loop import _truncated_rows
    from urlvr.trainer.update import without_rows

    groups = [group_of([3, 5], finish="eos"), group_of([5, 2], finish="length")]
    batch = collate_groups(groups, pad_token_id=0)
    masked = without_rows(batch, _truncated_rows(groups, batch))
    assert masked.response_mask[:2].equal(batch.response_mask[:2])
    assert int(masked.response_mask[2:].sum()) == 0 and int(batch.response_mask[2:].sum()) == 7


def test_mask_truncated_leaves_no_gradient_when_every_response_is_cut(random_tiny_model, tmp_path):
    """Two new tokens and no stop token: every response is truncated, so nothing trains; the
    control run (same rollouts and rewards, mask off) does update."""
    base = dict(plugins=["reward_plugins"], reward={"terms": [{"name": "test_first_token"}]},
                rollout={"group_size": 4, "max_new_tokens": 2}, trainer={"total_steps": 1, "prompts_per_step": 4,
                "prompts_per_minibatch": 4, "micro_batch_size": 8, "save_every": 0, "export_final_model": False})
    masked = urlvr.train(small_run_recipe(random_tiny_model[0], tmp_path / "masked", algorithm={"mask_truncated": True}, **base))
    control = urlvr.train(small_run_recipe(random_tiny_model[0], tmp_path / "control", **base))
    m, c = masked.metrics[0], control.metrics[0]
    assert m["response/truncation_rate"] == 1.0 and m["reward/zero_variance_group_fraction"] < 1.0
    assert m["loss/policy"] == 0.0 and m["actor/grad_norm"] == 0.0
    assert c["actor/grad_norm"] > 0.0 and c["reward/proxy_mean"] == m["reward/proxy_mean"]
    assert m["perf/response_tokens"] == 4 * 4 * 2  # metrics still describe every sampled row


# --------------------------------------------------------------------------- dynamic sampling: the filter
def paper_informative(rewards: list[float]) -> bool:
    """DAPO Eq. 11's constraint 0 < |{o_i correct}| < G, for any reward: not every r_i the same.
    "The same" up to float rounding (1e-5 of the largest |r|): the same response scored twice can
    differ in its last bits, and that is no signal (urlvr.algorithms.advantages.REWARD_RTOL)."""
    scale = max(abs(r) for r in rewards)
    return any(abs(r - rewards[0]) > 1e-5 * scale for r in rewards[1:])


@pytest.mark.parametrize("rewards", [
    [[1.0, 0.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [0.1, 0.1, 0.1, 0.1], [0.3, 0.3, 0.3, 0.30000000000000004],
     [0.3, 0.3, 0.3, 0.30001]],
    [[5.0], [0.0], [-1.0]],  # groups of one: never informative
    [[0.2, 0.2], [0.2, -0.2]],
])
def test_zero_variance_rule_matches_the_paper(rewards):
    from urlvr.algorithms.advantages import ADVANTAGE_ESTIMATORS
    from urlvr.trainer.group_filters import ZeroVarianceFilter, zero_variance_groups

    tensor = torch.tensor(rewards, dtype=torch.float64)
    expected = [not paper_informative(row) for row in rewards]
    assert zero_variance_groups(tensor).tolist() == expected
    assert ZeroVarianceFilter().keep(tensor, [[None] * len(r) for r in rewards]).tolist() == [not e for e in expected]
    for name in ("grpo", "dr_grpo", "rloo"):  # what the filter drops is exactly what gets no advantage
        no_signal = (ADVANTAGE_ESTIMATORS.get(name)(tensor) == 0).all(dim=1)
        assert no_signal.tolist() == expected, name


def test_agreement_filter_drops_confident_and_flat_groups():
    from urlvr.trainer.group_filters import AgreementFilter

    voters = [["1", "1", "1", "2"], ["1", "1", "2", "2"], ["1", "1", "1", "1"], [None, None, None, None]]
    rewards = torch.tensor([[1.0, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.float64)
    assert AgreementFilter(max_agreement=0.75).keep(rewards, voters).tolist() == [True, True, False, False]
    assert AgreementFilter(max_agreement=0.5).keep(rewards, voters).tolist() == [False, True, False, False]
    # filling: a reward spread first (by p_maj), zero-variance groups last
    priority = AgreementFilter(max_agreement=0.5).fill_priority(rewards, voters)
    assert priority.tolist() == [0.75, 0.5, 3.0, 2.0]


def paper_select(keep: list[bool], priority: list[float], quota: int) -> tuple[list[int], int]:
    """Reference: walk the draws in order taking informative groups; then fill by priority."""
    taken = []
    for i, k in enumerate(keep):
        if k and len(taken) < quota:
            taken.append(i)
    rest = [i for i, k in enumerate(keep) if not k]
    rest.sort(key=lambda i: (priority[i], i))
    filler = rest[:quota - len(taken)]
    return sorted(taken + filler), len(filler)


@pytest.mark.parametrize("seed", range(20))
def test_select_groups_matches_a_reference_loop(seed):
    from urlvr.trainer.group_filters import select_groups

    gen = torch.Generator().manual_seed(seed)
    n = int(torch.randint(4, 24, (1,), generator=gen))
    quota = int(torch.randint(1, n + 1, (1,), generator=gen))
    keep = (torch.rand(n, generator=gen) < 0.4)
    priority = torch.randint(0, 3, (n,), generator=gen).double()
    got = select_groups(keep, priority, quota)
    assert got == paper_select(keep.tolist(), priority.tolist(), quota)
    assert len(got[0]) == quota and len(set(got[0])) == quota


def fake_rounds(informative_per_round: list[list[bool]], seen: list, drawn_sizes: list, oracle_per_round=None):
    """(next_batch, sample_round) of a world of one: batch b's prompts are "b{b}p{i}"; a round's
    group i has rewards [1, 0] when informative, else [1, 1]; voters agree on informative groups' "x"."""
    from urlvr.rewards.compose import BatchRewards
    from urlvr.trainer.dynamic_sampling import Round

    batches = iter(range(100))

    def next_batch(size):
        drawn_sizes.append(size)
        b = next(batches)
        return [f"b{b}p{i}" for i in range(size)]

    def sample_round(records, round_index):
        seen.append(round_index)
        flags = informative_per_round[round_index]
        assert len(flags) == len(records)  # one flag per drawn prompt
        total = torch.tensor([[1.0, 0.0] if f else [1.0, 1.0] for f in flags])
        groups = [group_of([1, 2]) for _ in records]
        contexts = [RewardContext.for_group(["x", "y"] if f else ["x", "x"], torch.ones(2, 2), extract_answer=lambda t: None)
                    for f in flags]
        oracle = None if oracle_per_round is None else oracle_per_round[round_index]
        return Round(records, groups, groups, contexts, BatchRewards(total=total, per_term={"t": total},
                                                                     oracle=oracle, diagnostics={}, errors={}))

    return next_batch, sample_round


def run_dynamic_sample(informative_per_round, max_rounds: int, prompts_per_step: int = 4, prompts_per_round: int = 4,
                       oracle_per_round=None):
    from urlvr.dist import DistInfo
    from urlvr.trainer.dynamic_sampling import dynamic_sample
    from urlvr.trainer.group_filters import ZeroVarianceFilter

    seen, sizes = [], []
    next_batch, sample_round = fake_rounds(informative_per_round, seen, sizes, oracle_per_round)
    out = dynamic_sample(next_batch, sample_round, ZeroVarianceFilter(max_rounds=max_rounds), prompts_per_step,
                         prompts_per_round, DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    return out, seen, sizes


def test_dynamic_sample_rounds_indices_and_cap():
    """In a world of one: rounds stop once the quota is met, refill prompts get the next global
    indices, the selection keeps draw order, and at the cap filtered groups fill the step."""
    out, seen, sizes = run_dynamic_sample([[True, False, False, True], [False, True, True, True], [True] * 4], max_rounds=3)
    assert seen == [0, 1] and sizes == [4, 4]  # 2 informative, then 3 more: quota met after round 1
    assert out.records == ["b0p0", "b0p3", "b1p1", "b1p2"]  # draw order; b1p3 drawn, not needed
    assert out.metrics == {"dynamic_sampling/rounds": 2.0, "dynamic_sampling/prompts_consumed": 8.0,
                           "dynamic_sampling/filtered_fraction": 3 / 8, "dynamic_sampling/filled_groups": 0.0,
                           "dynamic_sampling/generated_proxy_mean": (5 * 0.5 + 3 * 1.0) / 8,
                           "dynamic_sampling/generated_majority_ratio": (5 * 0.5 + 3 * 1.0) / 8}
    capped, seen, _ = run_dynamic_sample([[False, False, True, False], [False] * 4, [True] * 4], max_rounds=2)
    assert seen == [0, 1] and capped.metrics["dynamic_sampling/filled_groups"] == 3.0
    assert capped.records == ["b0p0", "b0p1", "b0p2", "b0p3"]  # b0p2 informative; then the first drawn fill
    assert capped.rewards.total.tolist() == [[1.0, 1.0], [1.0, 1.0], [1.0, 0.0], [1.0, 1.0]]


def test_dynamic_sample_draws_prompts_per_round():
    """A generation batch of R != P prompts: every round draws R, the step still trains P groups,
    the first P informative in draw order (global index round * R + position), the surplus
    informative groups are dropped, and the counts say R per round."""
    flags = [[False, True, False, False, False, True], [True, True, True, True, True, True]]
    out, seen, sizes = run_dynamic_sample(flags, max_rounds=3, prompts_per_step=4, prompts_per_round=6)
    assert seen == [0, 1] and sizes == [6, 6]
    assert out.records == ["b0p1", "b0p5", "b1p0", "b1p1"]  # b1p2 .. b1p5 informative too: dropped, not carried
    assert out.metrics["dynamic_sampling/prompts_consumed"] == 12.0
    assert out.metrics["dynamic_sampling/filtered_fraction"] == 1 - 8 / 12
    small, seen, sizes = run_dynamic_sample([[True, True], [False, True], [True, True]], max_rounds=3,
                                            prompts_per_step=4, prompts_per_round=2)
    assert seen == [0, 1, 2] and sizes == [2, 2, 2]  # rounds smaller than the step
    assert small.records == ["b0p0", "b0p1", "b1p1", "b2p0"]
    assert small.metrics["dynamic_sampling/prompts_consumed"] == 6.0


def test_generated_rewards_describe_every_drawn_group():
    """`dynamic_sampling/generated_*` are the means over every group of every round (an
    independent flat mean over their samples), whereas the trained `reward/*` see the selection;
    the ground truth covers the labelled groups only and is absent without labels."""
    flags = [[True, False, False, True], [False, True, True, True]]
    nan = float("nan")
    oracle = [torch.tensor([[1.0, 0.0], [nan, nan], [1.0, 1.0], [0.0, 0.0]]),
              torch.tensor([[0.0, 1.0], [1.0, 1.0], [nan, nan], [0.0, 0.0]])]
    out, _, _ = run_dynamic_sample(flags, max_rounds=3, oracle_per_round=oracle)
    totals = torch.tensor([[1.0, 0.0] if f else [1.0, 1.0] for row in flags for f in row], dtype=torch.float64)
    every_oracle = torch.cat(oracle).double()
    labelled = every_oracle[~torch.isnan(every_oracle).any(dim=1)]
    assert out.metrics["dynamic_sampling/generated_proxy_mean"] == pytest.approx(float(totals.mean()), abs=1e-12)
    assert out.metrics["dynamic_sampling/generated_ground_truth_mean"] == pytest.approx(float(labelled.mean()), abs=1e-12)
    assert float(out.rewards.total.mean()) == 0.5  # the trained groups: all informative
    unlabelled, _, _ = run_dynamic_sample(flags, max_rounds=3, oracle_per_round=[None, None])
    assert "dynamic_sampling/generated_ground_truth_mean" not in unlabelled.metrics


def test_round_size_is_refused_where_it_cannot_act(tmp_path):
    """prompts_per_round: too few rounds to fill a step, rounds smaller than the world, a round
    size with dynamic sampling off, and 0 are each refused before step 1, naming the knobs."""
    from urlvr.dist import DistInfo
    from urlvr.errors import RecipeError
    from urlvr.recipe import load_recipe
    from urlvr.trainer.settings import RunSettings

    def load(dynamic, prompts_per_step=8):
        return load_recipe(small_run_recipe("unused", tmp_path, rollout={"dynamic_sampling": dynamic}, trainer={
            "total_steps": 2, "prompts_per_step": prompts_per_step, "prompts_per_minibatch": prompts_per_step,
            "micro_batch_size": 1}))

    with pytest.raises(RecipeError, match=r"max_rounds \(2\) x prompts_per_round \(3\) draws fewer prompts than "
                                          r"trainer.prompts_per_step \(8\).*raise max_rounds to 3 or prompts_per_round to 5"):
        load({"name": "zero_variance", "max_rounds": 2, "prompts_per_round": 3})
    with pytest.raises(RecipeError, match="unknown field 'prompts_per_round'"):
        load({"name": "none", "prompts_per_round": 3})
    with pytest.raises(RecipeError, match="prompts_per_round: Input should be greater than or equal to 1"):
        load({"name": "zero_variance", "prompts_per_round": 0})
    recipe = load({"name": "zero_variance", "max_rounds": 4, "prompts_per_round": 2}, prompts_per_step=4)
    settings = [RunSettings.derive(recipe, DistInfo(rank, 2, rank, torch.device("cpu"))) for rank in range(2)]
    assert [s.round_shard for s in settings] == [range(0, 1), range(1, 2)]  # each rank one whole group a round
    assert [s.prompt_shard for s in settings] == [range(0, 2), range(2, 4)]  # and two to train
    assert [s.round_first_index(3) for s in settings] == [6, 7]  # round r holds global indices r*R ..
    with pytest.raises(ValueError, match=r"prompts_per_round \(2\) is smaller than the world size \(3\)"):
        RunSettings.derive(recipe, DistInfo(0, 3, 0, torch.device("cpu")))
    default = RunSettings.derive(load("zero_variance"), DistInfo(0, 1, 0, torch.device("cpu")))
    assert default.prompts_per_round == 8 and default.round_first_index(1) == 8  # unset: the training batch


# --------------------------------------------------------------------------- dynamic sampling: CPU runs
def tiny_majority_recipe(out, dynamic_sampling="none", steps: int = 2) -> dict:
    """The embedded tiny model on arithmetic with majority voting: at temperature 0.2 two samples
    often agree (p_maj = 1), so many groups have no reward spread."""
    return small_run_recipe(
        "urlvr/tiny", out, reward={"terms": [{"name": "majority_vote"}], "oracle": "ground_truth"},
        data={"source": {"kind": "arithmetic", "num_problems": 64, "seed": 3}},
        rollout={"group_size": 2, "max_new_tokens": 72, "temperature": 0.2, "dynamic_sampling": dynamic_sampling},
        trainer={"total_steps": steps, "prompts_per_step": 4, "prompts_per_minibatch": 4, "micro_batch_size": 8,
                 "save_every": 0, "export_final_model": False})


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("dapo")
    plain = urlvr.train(tiny_majority_recipe(work / "plain"))
    filtered = urlvr.train(tiny_majority_recipe(work / "filtered", {"name": "zero_variance", "max_rounds": 4}))
    return work, plain.metrics, filtered.metrics


@pytest.mark.slow
def test_dynamic_sampling_raises_the_share_of_informative_groups(tiny_runs):
    _, plain, filtered = tiny_runs
    # step 1 starts from the same weights, and its first round is the plain run's step 1 (same seeds)
    assert plain[0]["reward/zero_variance_group_fraction"] > 0, "the test needs flat groups to filter"
    for m in filtered:  # only groups filling a capped step can be flat
        assert m["reward/zero_variance_group_fraction"] == m["dynamic_sampling/filled_groups"] / 4
        assert m["dynamic_sampling/prompts_consumed"] == 4 * m["dynamic_sampling/rounds"]
    assert filtered[0]["dynamic_sampling/rounds"] > 1
    assert filtered[0]["reward/zero_variance_group_fraction"] < plain[0]["reward/zero_variance_group_fraction"]
    share = lambda run: sum(1 - m["reward/zero_variance_group_fraction"] for m in run) / len(run)  # noqa: E731
    assert share(filtered) > share(plain)
    assert all(not k.startswith("dynamic_sampling/") for k in plain[0])


@pytest.mark.slow
def test_resume_with_dynamic_sampling_continues_exactly(tiny_runs):
    from test_training import stable

    work, _, filtered = tiny_runs
    recipe = tiny_majority_recipe(work / "split", {"name": "zero_variance", "max_rounds": 4}, steps=1)
    first = urlvr.train(recipe)
    resumed = urlvr.train({**recipe, "trainer": {**recipe["trainer"], "total_steps": 2}}, resume=first.run_dir)
    assert [m["step"] for m in resumed.metrics] == [2]
    assert stable(first.metrics + resumed.metrics) == stable(filtered)


ROUNDS_OF_6 = {"name": "zero_variance", "max_rounds": 4, "prompts_per_round": 6}


@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory):
    """A 2-step run with rounds of 6 prompts for a step of 4, every round's groups recorded as
    `_sample_round` returns them (wrapped, not changed), by step."""
    from urlvr.trainer import loop

    work, rounds = tmp_path_factory.mktemp("dapo_rounds"), {}
    original = loop._sample_round

    def recording(parts, dist, step, records, round_index):
        out = original(parts, dist, step, records, round_index)
        rounds.setdefault(step, []).append(out)
        return out

    patch = pytest.MonkeyPatch()
    patch.setattr(loop, "_sample_round", recording)
    try:
        result = urlvr.train(tiny_majority_recipe(work / "rounds", ROUNDS_OF_6))
    finally:
        patch.undo()
    return work, result.metrics, rounds


@pytest.mark.slow
def test_run_logs_every_generated_group_beside_the_trained_ones(recorded_run):
    """Each round draws prompts_per_round = 6 prompts while the step trains 4 groups; the logged
    dynamic_sampling/generated_* equal a flat mean over every recorded round's samples, and the
    trained reward/* differ from them where the filter dropped groups."""
    from urlvr.metrics.dynamics import majority_ratios

    _, metrics, rounds = recorded_run
    assert sorted(rounds) == [1, 2]
    differs = False
    for m in metrics:
        step_rounds = rounds[m["step"]]
        assert [len(r.records) for r in step_rounds] == [6] * len(step_rounds)  # the round size, not the step's 4
        assert m["dynamic_sampling/rounds"] == len(step_rounds)
        assert m["dynamic_sampling/prompts_consumed"] == 6 * len(step_rounds)
        total = torch.cat([r.rewards.total for r in step_rounds]).double()  # [6 * rounds, G]
        oracle = torch.cat([r.rewards.oracle for r in step_rounds]).double()  # every arithmetic prompt has a label
        p_maj = majority_ratios([ctx.voters for r in step_rounds for ctx in r.contexts])
        assert m["dynamic_sampling/generated_proxy_mean"] == pytest.approx(float(total.mean()), abs=1e-9)
        assert m["dynamic_sampling/generated_ground_truth_mean"] == pytest.approx(float(oracle.mean()), abs=1e-9)
        assert m["dynamic_sampling/generated_majority_ratio"] == pytest.approx(float(p_maj.mean()), abs=1e-9)
        differs |= m["dynamic_sampling/generated_proxy_mean"] != pytest.approx(m["reward/proxy_mean"])
    assert differs, "the test needs a step whose filter dropped groups with another mean reward"


@pytest.mark.slow
def test_resume_with_a_round_size_continues_exactly(recorded_run):
    """Surplus groups are dropped, not carried: the stream position is the whole state, and a
    run split at step 1 logs exactly what the uninterrupted one did."""
    from test_training import stable

    work, uninterrupted, _ = recorded_run
    recipe = tiny_majority_recipe(work / "split", ROUNDS_OF_6, steps=1)
    first = urlvr.train(recipe)
    resumed = urlvr.train({**recipe, "trainer": {**recipe["trainer"], "total_steps": 2}}, resume=first.run_dir)
    assert [m["step"] for m in resumed.metrics] == [2]
    assert stable(first.metrics + resumed.metrics) == stable(uninterrupted)
