"""The transformers rollout engine against HF's own forward/generate, and collation by hand."""

from __future__ import annotations

import copy
import re
from typing import Literal

import pytest
import torch

from urlvr.rollout import (
    ROLLOUT_ENGINES,
    Group,
    PromptInput,
    RolloutEngine,
    Sample,
    SamplingParams,
    TransformersRolloutEngine,
    collate_groups,
    position_ids_from_attention_mask,
)
from urlvr.rollout.base import check_engine
from urlvr.rollout.transformers_engine import filter_top_k_top_p
from urlvr.section import VariantSection

QUESTIONS = ["1+2=", "what is 12*3?", "hi"]  # different lengths, so batches are left-padded


@pytest.fixture(scope="module")
def tiny(random_tiny_model):
    _, model, tokenizer = random_tiny_model
    prompts = [
        PromptInput(prompt_id=f"p{i}", text=q, token_ids=tuple(tokenizer(q)["input_ids"]))
        for i, q in enumerate(QUESTIONS)
    ]
    return model, tokenizer, prompts


def make_engine(model, tokenizer, generation_batch_size: int = 64) -> TransformersRolloutEngine:
    return TransformersRolloutEngine(model, tokenizer, generation_batch_size=generation_batch_size)


def token_ids(groups: list[Group]) -> list[list[tuple[int, ...]]]:
    return [[s.token_ids for s in g.samples] for g in groups]


def test_registered_and_satisfies_protocol(tiny):
    model, tokenizer, _ = tiny
    assert ROLLOUT_ENGINES.get("transformers") is TransformersRolloutEngine
    engine = make_engine(model, tokenizer)
    assert isinstance(engine, RolloutEngine)
    engine.sync_weights(model)
    assert engine.model is model
    other = torch.nn.Linear(1, 1)
    engine.sync_weights(other)
    assert engine.model is other


def test_engine_is_built_from_its_own_recipe_section(tiny):
    from urlvr.dist import DistInfo
    from urlvr.recipe import Recipe
    from urlvr.rollout import TransformersEngineSection

    model, tokenizer, _ = tiny
    assert TransformersRolloutEngine.settings is TransformersEngineSection
    recipe = Recipe.model_validate({"rollout": {"engine": {"name": "transformers", "generation_batch_size": 5}}})
    engine = ROLLOUT_ENGINES.get(recipe.rollout.engine.name).from_recipe(recipe, model, tokenizer,
                                                                         DistInfo(0, 1, 0, torch.device("cpu")))
    assert engine.generation_batch_size == 5 and engine.model is model


def test_engine_registration_checks_the_section_name():
    from typing import Literal

    from urlvr.recipe.sections.base import VariantSection

    class MisnamedSection(VariantSection):
        name: Literal["other"] = "other"

    class Misnamed:
        settings = MisnamedSection

    class Bare:
        pass

    with pytest.raises(ValueError, match="registered as 'mine' but its section's `name` defaults to 'other'"):
        ROLLOUT_ENGINES.register("mine")(Misnamed)
    with pytest.raises(TypeError, match="has a `settings` VariantSection"):
        ROLLOUT_ENGINES.register("bare")(Bare)
    assert "mine" not in ROLLOUT_ENGINES and "bare" not in ROLLOUT_ENGINES


def test_engine_registration_checks_the_protocol_naming_the_member():
    class CheckedSection(VariantSection):
        name: Literal["checked"] = "checked"

    class Complete:
        settings = CheckedSection
        uses_trainer_module = False

        @classmethod
        def from_recipe(cls, recipe, model, tokenizer, dist):
            return cls()

        def generate(self, prompts, group_size, sampling, *more):
            return []

        def sync_weights(self, model):
            pass

        def offload(self):
            pass

    NoFlag = type("NoFlag", (), {k: v for k, v in vars(Complete).items() if k != "uses_trainer_module"})

    class NarrowGenerate(Complete):
        def generate(self, prompts, sampling):
            return []

    class InstanceFromRecipe(Complete):
        def from_recipe(self, recipe, model, tokenizer, dist):
            return self

    class OffloadNone(Complete):  # accepted before: hasattr() is true of None, and its signature was not read
        offload = None

    class GenerateText(Complete):
        generate = "sample"

    class FlagNone(Complete):  # would read as "samples from a copy": no ZeRO-3 gather around generate
        uses_trainer_module = None

    check_engine(Complete, "checked")  # extra optional parameters are fine
    for engine, message in [(NoFlag, "has no attribute 'uses_trainer_module' of the RolloutEngine protocol"),
                            (NarrowGenerate, "generate takes (self, prompts, sampling) where the trainer passes "
                                             "(prompts, group_size, sampling)"),
                            (InstanceFromRecipe, "from_recipe is not a classmethod"),
                            (OffloadNone, "offload is a NoneType, not a method (the trainer calls it)"),
                            (GenerateText, "generate is a str, not a method (the trainer calls it)"),
                            (FlagNone, "uses_trainer_module is None, not True or False")]:
        with pytest.raises(TypeError, match=re.escape(message)):
            ROLLOUT_ENGINES.register("checked")(engine)
    assert "checked" not in ROLLOUT_ENGINES
    for name in ROLLOUT_ENGINES.names():  # the built-ins follow their own protocol
        check_engine(ROLLOUT_ENGINES.get(name), name)


def test_groups_whole_and_in_prompt_order(tiny):
    model, tokenizer, prompts = tiny
    # A chunk size of 5 cuts groups of 4 across chunks; groups must still come back whole.
    groups = make_engine(model, tokenizer, generation_batch_size=5).generate(
        prompts, 4, SamplingParams(max_new_tokens=8, seed=0)
    )
    assert [g.prompt.prompt_id for g in groups] == ["p0", "p1", "p2"]
    assert [g.prompt for g in groups] == prompts
    assert all(g.size == 4 for g in groups)
    for group in groups:
        for sample in group.samples:
            assert 1 <= len(sample.token_ids) <= 8
            assert len(sample.logprobs) == len(sample.token_ids)
            assert sample.text == tokenizer.decode(sample.token_ids, skip_special_tokens=True)
            assert sample.finish_reason in ("eos", "stop", "length")


def test_seed_reproducible_and_different_seeds_differ(tiny):
    model, tokenizer, prompts = tiny
    engine = make_engine(model, tokenizer)
    first = engine.generate(prompts, 4, SamplingParams(max_new_tokens=12, seed=123))
    again = engine.generate(prompts, 4, SamplingParams(max_new_tokens=12, seed=123))
    other = engine.generate(prompts, 4, SamplingParams(max_new_tokens=12, seed=124))
    assert first == again
    assert token_ids(first) != token_ids(other)
    # Samples within a group differ too (they are independent draws, not copies).
    assert len(set(token_ids(first)[1])) > 1


def test_unseeded_sampling_follows_the_global_rng(tiny):
    model, tokenizer, prompts = tiny
    engine = make_engine(model, tokenizer)
    state = torch.get_rng_state()
    first = engine.generate(prompts, 2, SamplingParams(max_new_tokens=6))
    torch.set_rng_state(state)
    again = engine.generate(prompts, 2, SamplingParams(max_new_tokens=6))
    assert first == again


def hf_greedy(model, tokenizer, token_ids: tuple[int, ...], max_new_tokens: int) -> tuple[int, ...]:
    """HF's own greedy decoding of one unpadded prompt, up to and including eos."""
    out = model.generate(
        torch.tensor([token_ids]),
        attention_mask=torch.ones(1, len(token_ids), dtype=torch.long),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    response = out[0, len(token_ids) :].tolist()
    if tokenizer.eos_token_id in response:
        response = response[: response.index(tokenizer.eos_token_id) + 1]
    return tuple(response)


def test_greedy_matches_hf_generate_with_left_padding(tiny):
    model, tokenizer, prompts = tiny
    greedy = SamplingParams(max_new_tokens=16, greedy=True)
    groups = make_engine(model, tokenizer).generate(prompts, 3, greedy)
    for group in groups:
        assert len({s.token_ids for s in group.samples}) == 1
        assert group.samples[0].token_ids == hf_greedy(model, tokenizer, group.prompt.token_ids, 16)
    # Chunking (here one sequence at a time, so no padding at all) changes nothing.
    one_by_one = make_engine(model, tokenizer, generation_batch_size=1).generate(prompts, 1, greedy)
    assert [g.samples[0].token_ids for g in one_by_one] == [g.samples[0].token_ids for g in groups]


@pytest.mark.parametrize("top_k, top_p", [(1, 1.0), (0, 1e-6)], ids=["top_k=1", "top_p=1e-6"])
def test_degenerate_filters_equal_greedy(tiny, top_k, top_p):
    model, tokenizer, prompts = tiny
    engine = make_engine(model, tokenizer)
    greedy = engine.generate(prompts, 2, SamplingParams(max_new_tokens=10, greedy=True))
    filtered = engine.generate(prompts, 2, SamplingParams(max_new_tokens=10, top_k=top_k, top_p=top_p, seed=7))
    assert token_ids(filtered) == token_ids(greedy)


def processed_logprob64(logits_row: list[float], token: int, temperature: float, top_k: int, top_p: float) -> float:
    """Float64, by hand: log-prob of ``token`` under softmax(logits / T) restricted to the top_k
    most likely tokens, then to the nucleus (tokens whose mass ranked above is < top_p), renormalised."""
    import math

    z = [v / temperature for v in logits_row]
    order = sorted(range(len(z)), key=lambda v: -z[v])
    kept = order[:top_k] if top_k > 0 else order
    m = max(z[v] for v in kept)
    total = sum(math.exp(z[v] - m) for v in kept)
    nucleus, above = [], 0.0
    for v in kept:
        if above >= top_p:
            break
        nucleus.append(v)
        above += math.exp(z[v] - m) / total
    assert token in nucleus, "sampled a filtered token"
    m = max(z[v] for v in nucleus)
    return z[token] - m - math.log(sum(math.exp(z[v] - m) for v in nucleus))


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"), [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 0, 0.9), (0.7, 5, 0.8), (1.3, 3, 1.0)]
)
def test_sampler_logprobs_match_a_full_forward(tiny, temperature, top_k, top_p):
    """One uncached, unpadded forward per sample over prompt + response, then the sampled
    distribution by hand in float64 (temperature, top-k, top-p renormalised), reproduces the
    sampler's log-probs: checks left padding, position ids, the cache, temperature and filters."""
    model, tokenizer, prompts = tiny
    groups = make_engine(model, tokenizer).generate(
        prompts, 3, SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=12, seed=1)
    )
    for group in groups:
        for sample in group.samples:
            ids = torch.tensor([group.prompt.token_ids + sample.token_ids])
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0].double()  # [L, V]
            p = len(group.prompt.token_ids)
            expected = [processed_logprob64(logits[p - 1 + t].tolist(), token, temperature, top_k, top_p)
                        for t, token in enumerate(sample.token_ids)]
            torch.testing.assert_close(torch.tensor(sample.logprobs, dtype=torch.float64),
                                       torch.tensor(expected, dtype=torch.float64), atol=1e-5, rtol=0)


def test_sampler_logprobs_match_the_collated_scoring_pass(tiny):
    """The trainer's path: collate, one padded forward with position_ids_from_attention_mask."""
    model, tokenizer, prompts = tiny
    groups = make_engine(model, tokenizer).generate(prompts, 2, SamplingParams(max_new_tokens=10, seed=3))
    batch = collate_groups(groups, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=position_ids_from_attention_mask(batch.attention_mask),
        ).logits.float()
    p, t = batch.prompt_length, batch.response_mask.shape[1]
    logprobs = torch.log_softmax(logits[:, p - 1 : p + t - 1], dim=-1)  # [B*G, T, V]
    scored = logprobs.gather(-1, batch.input_ids[:, p:, None]).squeeze(-1) * batch.response_mask
    torch.testing.assert_close(scored, batch.sampler_logprobs, atol=1e-5, rtol=0)


def test_max_new_tokens_and_length_reason(tiny):
    model, tokenizer, prompts = tiny
    groups = make_engine(model, tokenizer).generate(prompts, 4, SamplingParams(max_new_tokens=3, seed=0))
    for sample in (s for g in groups for s in g.samples):
        assert len(sample.token_ids) <= 3
        last_is_terminal = sample.token_ids[-1] == tokenizer.eos_token_id
        assert sample.finish_reason == ("eos" if last_is_terminal else "length")
    assert any(s.finish_reason == "length" for g in groups for s in g.samples)


def first_sampled_tokens(engine, prompts, sampling) -> list[int]:
    groups = engine.generate(prompts, 4, sampling)
    return [s.token_ids[0] for g in groups for s in g.samples]


def test_stop_token_ids_end_with_reason_stop(tiny):
    model, tokenizer, prompts = tiny
    engine = make_engine(model, tokenizer)
    # A token the random model samples early, declared a stop token.
    firsts = first_sampled_tokens(engine, prompts, SamplingParams(max_new_tokens=1, seed=5))
    stop = max(set(firsts) - {tokenizer.eos_token_id}, key=firsts.count)
    groups = engine.generate(prompts, 4, SamplingParams(max_new_tokens=30, stop_token_ids=(stop,), seed=5))
    stopped = [s for g in groups for s in g.samples if s.finish_reason == "stop"]
    assert stopped
    for sample in stopped:
        assert sample.token_ids[-1] == stop and stop not in sample.token_ids[:-1]
    for sample in (s for g in groups for s in g.samples if s.finish_reason == "length"):
        assert stop not in sample.token_ids and len(sample.token_ids) == 30


def test_eos_ends_with_reason_eos(tiny):
    model, tokenizer, prompts = tiny
    engine = make_engine(model, tokenizer)
    # The random model rarely picks eos, so make its favourite first token the eos of a copy
    # of the tokenizer.
    firsts = first_sampled_tokens(engine, prompts, SamplingParams(max_new_tokens=1, seed=5))
    frequent = max(set(firsts), key=firsts.count)
    eos_tokenizer = copy.deepcopy(tokenizer)
    eos_tokenizer.eos_token = tokenizer.convert_ids_to_tokens(frequent)
    assert eos_tokenizer.eos_token_id == frequent
    eos_engine = make_engine(model, eos_tokenizer)
    # The model's generation_config still names the original eos: both end a response.
    eos_ids = {frequent, tokenizer.eos_token_id}
    assert eos_engine.eos_token_ids == eos_ids
    groups = eos_engine.generate(prompts, 4, SamplingParams(max_new_tokens=30, seed=5))
    ended = [s for g in groups for s in g.samples if s.finish_reason == "eos"]
    assert any(s.token_ids[-1] == frequent for s in ended)
    for sample in ended:
        assert sample.token_ids[-1] in eos_ids and not eos_ids & set(sample.token_ids[:-1])
    for sample in (s for g in groups for s in g.samples if s.finish_reason == "length"):
        assert not eos_ids & set(sample.token_ids) and len(sample.token_ids) == 30
    # Rows stop growing where they end: no padding in the records.
    assert len({len(s.token_ids) for s in ended}) > 1


def test_generation_config_eos_ids_also_end_with_reason_eos(tiny):
    model, tokenizer, prompts = tiny
    engine = make_engine(model, tokenizer)
    firsts = first_sampled_tokens(engine, prompts, SamplingParams(max_new_tokens=1, seed=5))
    frequent = max(set(firsts), key=firsts.count)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, frequent]
    try:
        assert engine.eos_token_ids == {tokenizer.eos_token_id, frequent}
        groups = engine.generate(prompts, 4, SamplingParams(max_new_tokens=30, seed=5))
    finally:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    assert any(s.finish_reason == "eos" and s.token_ids[-1] == frequent for g in groups for s in g.samples)


@pytest.mark.parametrize("start_in_train_mode", [True, False])
def test_model_mode_restored_and_cache_used_under_gradient_checkpointing(tiny, start_in_train_mode):
    model, tokenizer, prompts = tiny
    reference = make_engine(model, tokenizer).generate(prompts, 2, SamplingParams(max_new_tokens=8, seed=9))
    model.activation_checkpointing_enable()  # the v5 name of gradient_checkpointing_enable
    model.config.use_cache = False  # what trainers set alongside gradient checkpointing
    model.train(start_in_train_mode)
    if start_in_train_mode:
        model.model.layers[0].mlp.eval()  # a submodule in its own mode must keep it
    try:
        before = {name: m.training for name, m in model.named_modules()}
        groups = make_engine(model, tokenizer).generate(prompts, 2, SamplingParams(max_new_tokens=8, seed=9))
        assert {name: m.training for name, m in model.named_modules()} == before
        assert model.config.use_cache is False
        assert groups == reference  # eval mode: no dropout, and the cache was used
    finally:
        model.activation_checkpointing_disable()
        model.config.use_cache = True
        model.eval()


def test_invalid_arguments_refused(tiny):
    model, tokenizer, prompts = tiny
    engine = make_engine(model, tokenizer)
    with pytest.raises(ValueError, match="group_size"):
        engine.generate(prompts, 0, SamplingParams())
    with pytest.raises(ValueError, match="temperature"):
        engine.generate(prompts, 2, SamplingParams(temperature=0.0))
    with pytest.raises(ValueError, match="no tokens"):
        engine.generate([PromptInput("empty", "", ())], 2, SamplingParams())
    assert engine.generate([], 2, SamplingParams()) == []


def test_filter_top_k_top_p_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    inf = float("-inf")
    assert filter_top_k_top_p(logits, top_k=2, top_p=1.0)[0, 2:].tolist() == [inf, inf]
    # Mass above each token: 0, .5, .8, .95 -> top_p=0.8 keeps the first two.
    kept = filter_top_k_top_p(logits, top_k=0, top_p=0.8).isfinite()[0].tolist()
    assert kept == [True, True, False, False]
    assert torch.equal(filter_top_k_top_p(logits, top_k=0, top_p=1.0), logits)


# --------------------------------------------------------------------------- collate
def hand_groups() -> list[Group]:
    def sample(ids, lps, reason="eos"):
        return Sample(token_ids=ids, logprobs=lps, text="", finish_reason=reason)

    return [
        Group(
            prompt=PromptInput("a", "", (11, 12)),
            samples=(sample((21,), (-0.1,)), sample((22, 23, 2), (-0.2, -0.3, -0.4))),
        ),
        Group(
            prompt=PromptInput("b", "", (13, 14, 15)),
            samples=(sample((24, 25), (-0.5, -0.6), "length"), sample((26, 2), (-0.7, -0.8))),
        ),
    ]


def test_collate_shapes_masks_and_padding():
    batch = collate_groups(hand_groups(), pad_token_id=0)
    assert batch.prompt_length == 3 and batch.group_size == 2
    assert batch.input_ids.tolist() == [
        [0, 11, 12, 21, 0, 0],
        [0, 11, 12, 22, 23, 2],
        [13, 14, 15, 24, 25, 0],
        [13, 14, 15, 26, 2, 0],
    ]
    assert batch.attention_mask.tolist() == [
        [0, 1, 1, 1, 0, 0],
        [0, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 0],
    ]
    assert batch.response_mask.tolist() == [[1, 0, 0], [1, 1, 1], [1, 1, 0], [1, 1, 0]]
    assert batch.sampler_logprobs.dtype == torch.float32
    expected = torch.tensor([[-0.1, 0, 0], [-0.2, -0.3, -0.4], [-0.5, -0.6, 0], [-0.7, -0.8, 0]])
    torch.testing.assert_close(batch.sampler_logprobs, expected)
    assert position_ids_from_attention_mask(batch.attention_mask).tolist() == [
        [0, 0, 1, 2, 2, 2],
        [0, 0, 1, 2, 3, 4],
        [0, 1, 2, 3, 4, 4],
        [0, 1, 2, 3, 4, 4],
    ]


def test_collate_refuses_mismatched_group_sizes():
    first, second = hand_groups()
    with pytest.raises(ValueError, match="same size"):
        collate_groups([first, Group(second.prompt, second.samples[:1])], pad_token_id=0)
    with pytest.raises(ValueError, match="at least one"):
        collate_groups([], pad_token_id=0)


def test_per_row_generators_sample_the_right_distribution():
    """The per-row (seeded) path draws from softmax(logits / T): empirical frequencies over
    20k rows match the probabilities (5 sigma band), and greedy-only mass is never violated."""
    from urlvr.rollout.base import SamplingParams
    from urlvr.rollout.transformers_engine import sample_next_tokens

    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -30.0]).repeat(20_000, 1)
    sampling = SamplingParams(temperature=0.8, top_k=4)
    generators = [torch.Generator().manual_seed(i) for i in range(logits.shape[0])]
    tokens, _ = sample_next_tokens(logits, sampling, generators)
    expected = torch.softmax(logits[0, :4] / 0.8, dim=-1)
    counts = torch.bincount(tokens, minlength=5).double() / tokens.numel()
    sigma = (expected * (1 - expected) / tokens.numel()).sqrt()
    assert counts[4] == 0  # filtered by top_k
    assert torch.all((counts[:4] - expected).abs() < 5 * sigma), (counts, expected)


def test_finished_rows_leave_the_batch_and_cost_no_more_forwards(tiny):
    """Mixed lengths: a row that ended is fed to the model no more, so a batch whose rows stop
    early processes fewer tokens than one that runs to ``max_new_tokens``; the samples equal
    those of each group generated alone (per-row seeds: draws independent of the batch)."""
    model, tokenizer, prompts = tiny
    # Make the random model's favourite first token eos, so that most rows end early.
    firsts = first_sampled_tokens(make_engine(model, tokenizer), prompts, SamplingParams(max_new_tokens=1, seed=5))
    eos_tokenizer = copy.deepcopy(tokenizer)
    eos_tokenizer.eos_token = tokenizer.convert_ids_to_tokens(max(set(firsts), key=firsts.count))
    engine, budget, group_size = make_engine(model, eos_tokenizer), 24, 4
    sampling = SamplingParams(max_new_tokens=budget, prompt_seeds=(11, 12, 13))

    decode_rows: list[int] = []  # rows fed to the model at each decoding step (after the prefill)

    def count_rows(module, args, kwargs):
        if kwargs["input_ids"].shape[1] == 1:
            decode_rows.append(kwargs["input_ids"].shape[0])

    hook = model.register_forward_pre_hook(count_rows, with_kwargs=True)
    try:
        groups = engine.generate(prompts, group_size, sampling)
    finally:
        hook.remove()
    lengths = [len(s.token_ids) for g in groups for s in g.samples]
    rows = len(lengths)
    assert min(lengths) < budget // 2 and sum(n < budget for n in lengths) > rows // 2  # mixed, mostly early
    assert decode_rows == sorted(decode_rows, reverse=True) and decode_rows[0] <= rows
    # Each row is fed once per token it sampled after the first and before it ended.
    assert sum(decode_rows) == sum(n - 1 for n in lengths) < 0.6 * rows * (budget - 1)
    assert len(decode_rows) == max(lengths) - 1

    # Dropping rows changes no sample: each group alone (one row per forward) gives the same.
    for p, group in enumerate(groups):
        alone = make_engine(model, eos_tokenizer, generation_batch_size=1).generate(
            prompts[p : p + 1], group_size, SamplingParams(max_new_tokens=budget, prompt_seeds=(11 + p,)))
        assert [s.token_ids for s in alone[0].samples] == [s.token_ids for s in group.samples]
        assert [s.finish_reason for s in alone[0].samples] == [s.finish_reason for s in group.samples]
        for a, b in zip(alone[0].samples, group.samples):  # padding and batch change float noise only
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)


def test_generation_uses_the_current_cache_api_and_warns_nothing(tiny, monkeypatch):
    """The quiet console: the engine passes and reads the KV cache by its current name, so
    transformers emits neither its FutureWarning nor its `past_key_values` deprecation line."""
    import warnings

    from transformers.utils import generic

    model, tokenizer, prompts = tiny
    logged: list[str] = []
    monkeypatch.setattr(generic.logger, "warning_once", lambda message, *a, **k: logged.append(message))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_engine(model, tokenizer).generate(prompts, 2, SamplingParams(max_new_tokens=6, seed=0))
    assert [str(w.message) for w in caught if "past_key_values" in str(w.message)] == []
    assert [m for m in logged if "past_key_values" in m] == []


# --------------------------------------------------------------------------- the engines at the edges
def with_context(model, context: int):
    """A copy of the session's tiny model that declares a context of ``context`` tokens."""
    capped = copy.deepcopy(model)
    capped.config.max_position_embeddings = context
    return capped


def test_responses_stop_at_the_context_with_reason_length(tiny):
    """Prompts of 4, 13 and 2 tokens, context 16, max_new_tokens 10: the 13-token prompt's responses
    get 3 tokens and end with `length` (as vLLM caps at max_model_len); the others get 10. Capping
    changes nothing but where a response is cut (per-row seeds)."""
    model, tokenizer, prompts = tiny
    assert [len(p.token_ids) for p in prompts] == [4, 13, 2]
    sampling = SamplingParams(max_new_tokens=10, prompt_seeds=(1, 2, 3))
    free = make_engine(model, tokenizer).generate(prompts, 4, sampling)
    capped = make_engine(with_context(model, 16), tokenizer).generate(prompts, 4, sampling)
    for prompt, free_group, group in zip(prompts, free, capped):
        budget = min(10, 16 - len(prompt.token_ids))
        for full, sample in zip(free_group.samples, group.samples):
            assert sample.token_ids == full.token_ids[:budget]
            assert sample.logprobs == pytest.approx(full.logprobs[:budget], abs=1e-5)
            assert len(prompt.token_ids) + len(sample.token_ids) <= 16
            ended = sample.token_ids[-1] == tokenizer.eos_token_id
            assert sample.finish_reason == ("eos" if ended else "length")
    assert {len(s.token_ids) for s in capped[1].samples} == {3}  # the random model rarely picks eos
    assert any(len(s.token_ids) == 10 for s in capped[0].samples + capped[2].samples)


def test_a_stop_token_on_the_last_allowed_step_is_stop_not_length(tiny):
    """eos, then a stop id, then the cap: the order of vLLM's `check_stop` (rollout.base.finish_reason)."""
    model, tokenizer, prompts = tiny
    engine = make_engine(model, tokenizer)
    firsts = first_sampled_tokens(engine, prompts, SamplingParams(max_new_tokens=1, seed=5))
    frequent = max(set(firsts), key=firsts.count)
    groups = engine.generate(prompts, 4, SamplingParams(max_new_tokens=1, stop_token_ids=(frequent,), seed=5))
    reasons = {s.token_ids[-1]: s.finish_reason for g in groups for s in g.samples}
    assert reasons[frequent] == "stop" and set(reasons.values()) == {"stop", "length"}


def test_a_prompt_that_fills_the_context_is_refused(tiny):
    model, tokenizer, prompts = tiny
    engine = make_engine(with_context(model, 13), tokenizer)
    with pytest.raises(ValueError) as info:
        engine.generate(prompts, 2, SamplingParams(max_new_tokens=4))
    assert str(info.value) == ("prompt 'p1' has 13 tokens and the model's context length "
                               "(config.max_position_embeddings) is 13: no room for a response")
    # one token of room is one token of response
    groups = make_engine(with_context(model, 14), tokenizer).generate(prompts, 2, SamplingParams(max_new_tokens=4, seed=0))
    assert [len(s.token_ids) for s in groups[1].samples] == [1, 1]


def fake_vllm_engine(tokenizer, max_model_len: int, eos_ids: set[int]):
    """The vLLM engine's own code, without vLLM: everything it does before it calls `vllm.LLM`."""
    from urlvr.rollout.vllm_engine import VLLMRolloutEngine

    engine = VLLMRolloutEngine.__new__(VLLMRolloutEngine)
    engine.tokenizer, engine.max_model_len, engine.eos_token_ids, engine.asleep = tokenizer, max_model_len, frozenset(eos_ids), False
    return engine


@pytest.mark.parametrize("args, message", [
    ((0, SamplingParams()), "group_size must be >= 1, got 0"),
    ((2, SamplingParams(temperature=0.0)), "temperature must be > 0 (or greedy=True), got 0.0"),
    ((2, SamplingParams(max_new_tokens=0)), "max_new_tokens must be >= 1, got 0"),
    ((2, SamplingParams(prompt_seeds=(1,))), "prompt_seeds has 1 seeds for 3 prompts"),
])
def test_both_engines_refuse_the_same_requests_alike(tiny, args, message):
    """The vLLM engine used to pass temperature 0 on as greedy and group_size 0 on to vLLM."""
    model, tokenizer, prompts = tiny
    for engine in (make_engine(model, tokenizer), fake_vllm_engine(tokenizer, 512, {tokenizer.eos_token_id})):
        with pytest.raises(ValueError) as info:
            engine.generate(prompts, *args)
        assert str(info.value) == message, type(engine).__name__


def test_vllm_engine_refuses_a_prompt_that_fills_max_model_len(tiny):
    model, tokenizer, prompts = tiny
    with pytest.raises(ValueError) as info:
        fake_vllm_engine(tokenizer, 13, {tokenizer.eos_token_id}).generate(prompts, 2, SamplingParams())
    assert str(info.value) == ("prompt 'p1' has 13 tokens and max_model_len (rollout.engine.max_model_len, at most "
                               "the model's context length) is 13: no room for a response")
    with pytest.raises(ValueError, match="no tokens"):
        fake_vllm_engine(tokenizer, 13, set()).generate([PromptInput("empty", "", ())], 2, SamplingParams())


@pytest.mark.parametrize("vllm_reason, stop_reason, last, want", [
    ("stop", None, 1, "eos"),      # vLLM's own eos check
    ("stop", 7, 7, "eos"),         # a generation_config eos id, which vLLM adds to the stop ids
    ("stop", 9, 9, "stop"),        # a stop_token_id
    ("length", None, 1, "eos"),    # vLLM releases that check the cap first: eos on the last allowed token
    ("length", None, 9, "stop"),
    ("length", None, 5, "length"),
])
def test_vllm_finish_reasons_read_as_the_transformers_engines(vllm_reason, stop_reason, last, want):
    from types import SimpleNamespace

    engine = fake_vllm_engine(None, 64, {1, 7})
    completion = SimpleNamespace(finish_reason=vllm_reason, stop_reason=stop_reason, token_ids=[3, 4, last])
    assert engine._finish_reason(completion, (9,)) == want


def test_vllm_finish_reason_abort_is_an_error():
    from types import SimpleNamespace

    with pytest.raises(RuntimeError, match="finish_reason='abort'"):
        fake_vllm_engine(None, 64, {1})._finish_reason(SimpleNamespace(finish_reason="abort", stop_reason=None,
                                                                       token_ids=[3]), ())


def test_vllm_plans_for_the_longest_response_the_run_asks_for():
    """An evaluation budget above the training one was cut at max_model_len by vLLM alone."""
    from urlvr.recipe import Recipe
    from urlvr.rollout.vllm_engine import planned_max_model_len

    def recipe(**engine):
        return Recipe.model_validate({"data": {"max_prompt_length": 100}, "rollout": {
            "max_new_tokens": 50, "engine": {"name": "vllm", **engine}}, "eval": {
                "max_new_tokens": 300, "at_end": True, "source": {"kind": "arithmetic", "num_problems": 8}}})

    assert planned_max_model_len(recipe(), None) == 400
    assert planned_max_model_len(recipe(), 256) == 256  # never past the model's context
    assert planned_max_model_len(recipe(max_model_len=128), 256) == 128
    assert planned_max_model_len(Recipe.model_validate({"data": {"max_prompt_length": 100}, "rollout": {
        "max_new_tokens": 50, "engine": "vllm"}}), None) == 150
