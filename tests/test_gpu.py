"""The CUDA subset: bf16 training under ZeRO-0/2/3 in one process, the transformers engine on CUDA.

Skipped on CPU. ``bench/gpu/check.py`` runs this file on a GPU machine (one call, see
bench/gpu/README.md) and collects it in its CPU ``--dry-run``, which tests/test_bench_gpu.py runs.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import small_run_recipe

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def cuda_tiny(random_tiny_model):
    path, model, tokenizer = random_tiny_model
    from urlvr.rollout import PromptInput

    prompts = [PromptInput(f"p{i}", q, tuple(tokenizer(q)["input_ids"])) for i, q in enumerate(["1+2=", "what is 12*3?"])]
    return path, model, tokenizer, prompts


@pytest.mark.parametrize("zero_stage", [0, 2, 3])
def test_bf16_training_steps_under_zero(cuda_tiny, tmp_path, zero_stage):
    """Two bf16 steps per ZeRO stage, all in this one process (DeepSpeed's engine per run)."""
    import urlvr

    path, *_ = cuda_tiny
    out = tmp_path / f"zero{zero_stage}"
    recipe = small_run_recipe(path, out, optim={"lr": 1e-3, "deepspeed": {"zero_stage": zero_stage, "precision": "bf16"}})
    urlvr.train(recipe)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    assert len(rows) == 2
    values = [v for row in rows for k, v in row.items() if k.startswith(("loss", "train/", "actor/")) and isinstance(v, float)]
    assert all(v == v for v in values)  # no NaN in the losses and update statistics


def test_transformers_engine_on_cuda_matches_cpu(cuda_tiny):
    """Greedy rollouts on CUDA equal those on CPU; seeded sampling is reproducible on CUDA."""
    import copy

    from urlvr.rollout import SamplingParams, TransformersRolloutEngine

    _, model, tokenizer, prompts = cuda_tiny
    on_gpu = copy.deepcopy(model).cuda()
    greedy = SamplingParams(max_new_tokens=12, greedy=True)
    cpu_groups = TransformersRolloutEngine(model, tokenizer).generate(prompts, 2, greedy)
    gpu_groups = TransformersRolloutEngine(on_gpu, tokenizer).generate(prompts, 2, greedy)
    assert [[s.token_ids for s in g.samples] for g in gpu_groups] == [[s.token_ids for s in g.samples] for g in cpu_groups]
    engine = TransformersRolloutEngine(on_gpu, tokenizer)
    sampling = SamplingParams(max_new_tokens=12, prompt_seeds=(1, 2))
    assert engine.generate(prompts, 4, sampling) == engine.generate(prompts, 4, sampling)
