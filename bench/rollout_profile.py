"""Where urlvr's rollout spends its time on a real model: the per-row draw before and after 14abf5d.

    .venv/bin/python bench/rollout_profile.py                          # SmolLM2, 4 prompts x 4 samples x 24 tokens
    .venv/bin/python bench/rollout_profile.py --prompts 8 --max-new-tokens 32 --out /tmp/rollout.json

Per-prompt seeds, as the trainer samples, so every row draws from its own generator. Two draws,
side by side in one run (same model, prompts and load):

- ``inverse-CDF`` (urlvr's draw since commit 14abf5d, ``inverse_cdf_draw``): one uniform per row
  from its own generator, a float64 ``cumsum`` of the row's probabilities, ``searchsorted``;
- ``exponential race`` (the draw before it, kept here to measure against): one ``exponential_``
  fill of the whole vocabulary per row per token, argmax of p / noise.

Part 1 -- ``TransformersRolloutEngine.generate`` on ``--model`` with each draw (the race
monkeypatched in for its turn), each call after an unprofiled warm-up call with the same prompts,
under ``torch.profiler``: wall time, the self CPU time of the top operators, and the draw's own
operators (``aten::exponential_`` for the race; ``aten::cumsum`` + ``aten::searchsorted`` +
``aten::uniform_`` for the inverse CDF).

Part 2 -- the draws alone, on ``[rows, V]`` logits at the model's vocabulary, per generated token
(min over ``--repeats``): ``sample_next_tokens`` (softmax + inverse-CDF draw), the same with the
race, each draw after the softmax, and the softmax. Prints tables and writes JSON (default
bench/results/rollout_profile.json).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        fn()
        times.append(time.perf_counter() - begin)
    return min(times)


DRAW_OPS = {"aten::exponential_", "aten::cumsum", "aten::searchsorted", "aten::uniform_"}


def exponential_race(probs, generators):
    """The per-row draw before commit 14abf5d: argmax_v p_v / E_v, E_v ~ Exp(1) from the row's
    generator, one fill of V floats per row (samples v with probability p_v). [A, V] -> [A]."""
    import torch

    noise = torch.stack([torch.empty(probs.shape[-1], device=probs.device).exponential_(generator=g)
                         for g in generators])  # [A, V]
    return (probs / noise.clamp_min(torch.finfo(noise.dtype).tiny)).argmax(dim=-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="urlvr/smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20, help="repeats of each part-2 measurement (min taken)")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results" / "rollout_profile.json")
    args = parser.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import urlvr.rollout.transformers_engine as engine_module

    from urlvr.data.synthetic import arithmetic_problems
    from urlvr.models.resolve import resolve_model_path
    from urlvr.rollout.base import PromptInput, SamplingParams
    from urlvr.rollout.transformers_engine import (
        TransformersRolloutEngine,
        inverse_cdf_draw,
        sample_next_tokens,
        sample_seed,
    )

    torch.set_num_threads(args.threads)
    folder = resolve_model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    prompts = []
    for i, record in enumerate(arithmetic_problems(args.prompts, 1)):
        text = tokenizer.apply_chat_template([{"role": "user", "content": record.prompt}], tokenize=False,
                                             add_generation_prompt=True)
        prompts.append(PromptInput(f"p{i}", text, tuple(tokenizer(text, add_special_tokens=False)["input_ids"])))
    engine = TransformersRolloutEngine(model, tokenizer, generation_batch_size=args.prompts * args.group_size)
    sampling = SamplingParams(max_new_tokens=args.max_new_tokens, prompt_seeds=tuple(range(1, args.prompts + 1)))

    def profiled_rollout(draw) -> dict:
        engine_module.inverse_cdf_draw = draw  # sample_next_tokens looks the draw up at call time
        try:
            engine.generate(prompts, args.group_size, sampling)  # warm-up
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                begin = time.perf_counter()
                groups = engine.generate(prompts, args.group_size, sampling)
                wall = time.perf_counter() - begin
        finally:
            engine_module.inverse_cdf_draw = inverse_cdf_draw
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in events) / 1e6
        draw_s = sum(e.self_cpu_time_total for e in events if e.key in DRAW_OPS) / 1e6
        return {"rollout_wall_s": wall, "ops_self_cpu_total_s": total, "draw_ops_self_cpu_s": draw_s,
                "draw_share_of_ops": draw_s / total,
                "decode_steps": max(len(s.token_ids) for g in groups for s in g.samples),
                "top_ops": [{"op": e.key, "self_cpu_s": e.self_cpu_time_total / 1e6, "calls": e.count}
                            for e in events[:12]]}

    rollouts = {"exponential race": profiled_rollout(exponential_race), "inverse-CDF": profiled_rollout(inverse_cdf_draw)}
    for name, r in rollouts.items():
        print(f"\n{name}: {args.prompts} prompts x {args.group_size} samples x {args.max_new_tokens} tokens "
              f"({r['decode_steps']} decode steps), vocab {vocab:,}, {r['rollout_wall_s']:.2f} s wall under the "
              f"profiler; ops' self CPU total {r['ops_self_cpu_total_s']:.2f} s")
        print(f"{'op':<52} {'self CPU s':>11} {'share':>7} {'calls':>7}")
        for row in r["top_ops"]:
            print(f"{row['op']:<52} {row['self_cpu_s']:>11.3f} {row['self_cpu_s'] / r['ops_self_cpu_total_s']:>7.1%} "
                  f"{row['calls']:>7}")
        print(f"the draw's own ops ({', '.join(sorted(DRAW_OPS))}): {r['draw_ops_self_cpu_s']:.3f} s = "
              f"{r['draw_share_of_ops']:.1%} of the ops' self CPU time")

    # part 2: the sampler alone, per generated token, at this vocabulary
    rows = args.prompts * args.group_size
    torch.manual_seed(0)
    logits = torch.randn(rows, vocab) * 3
    generators = [torch.Generator().manual_seed(sample_seed(1, i)) for i in range(rows)]
    row_sampling = SamplingParams(max_new_tokens=1, prompt_seeds=(1,))
    probs = torch.softmax(logits, dim=-1)

    def timed_sampler(draw):
        def run() -> None:
            engine_module.inverse_cdf_draw = draw
            try:
                sample_next_tokens(logits, row_sampling, generators)
            finally:
                engine_module.inverse_cdf_draw = inverse_cdf_draw
        return run

    sampler = {name: best_of(fn, args.repeats) for name, fn in (
        ("sample_next_tokens (inverse-CDF)", timed_sampler(inverse_cdf_draw)),
        ("sample_next_tokens (exponential race)", timed_sampler(exponential_race)),
        ("inverse-CDF draw alone", lambda: inverse_cdf_draw(probs, generators)),
        ("exponential race alone", lambda: exponential_race(probs, generators)),
        ("softmax", lambda: torch.softmax(logits, dim=-1)))}
    print(f"\nsampler alone, {rows} rows x {vocab:,} vocabulary, per decode step (min of {args.repeats}):")
    for name, seconds in sampler.items():
        print(f"  {name:<40} {seconds * 1e3:8.2f} ms")
    race, inverse = rollouts["exponential race"], rollouts["inverse-CDF"]
    print(f"rollout wall: {race['rollout_wall_s']:.2f} s with the race, {inverse['rollout_wall_s']:.2f} s with the "
          f"inverse CDF ({inverse['rollout_wall_s'] / race['rollout_wall_s']:.2f}x); the draw's ops "
          f"{race['draw_share_of_ops']:.1%} -> {inverse['draw_share_of_ops']:.1%} of the ops' self CPU time")
    report = {"settings": {k: str(v) for k, v in vars(args).items()}, "vocab": vocab, "rows": rows,
              "rollouts": rollouts, "sampler_per_step_s": sampler}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
