"""Where urlvr's rollout spends its time on a real model, and the share of the per-row sampler noise.

    .venv/bin/python bench/rollout_profile.py                          # SmolLM2, 4 prompts x 4 samples x 24 tokens
    .venv/bin/python bench/rollout_profile.py --prompts 8 --max-new-tokens 32 --out /tmp/rollout.json

Part 1 -- ``TransformersRolloutEngine.generate`` on ``--model`` as the trainer calls it (per-prompt
seeds, so every row draws from its own generator: ``sample_next_tokens``' exponential race, one
``exponential_`` fill of the whole vocabulary per row per token), under ``torch.profiler``: the
rollout's wall time and the self CPU time of its top operators, ``aten::exponential_`` among them.
The profiled call follows an unprofiled warm-up call with the same prompts.

Part 2 -- the sampler alone, on ``[rows, V]`` logits at the model's vocabulary, per generated
token (min over ``--repeats``): the current sampler (``sample_next_tokens`` with per-row
generators), its noise fill alone, and what an inverse-CDF draw with O(1) noise per row would
cost: one uniform per row from its own generator, then ``searchsorted`` in the row's cumulative
probabilities (one vectorised ``cumsum`` pass over ``[rows, V]``). Only measured here: changing the
sampler would change every seeded rollout. Prints tables and writes JSON (default
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
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from urlvr.data.synthetic import arithmetic_problems
    from urlvr.models.resolve import resolve_model_path
    from urlvr.rollout.base import PromptInput, SamplingParams
    from urlvr.rollout.transformers_engine import TransformersRolloutEngine, sample_next_tokens, sample_seed

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
    engine.generate(prompts, args.group_size, sampling)  # warm-up
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        begin = time.perf_counter()
        groups = engine.generate(prompts, args.group_size, sampling)
        rollout_s = time.perf_counter() - begin
    steps = max(len(s.token_ids) for g in groups for s in g.samples)  # decode steps the batch ran
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    profiled_total = sum(e.self_cpu_time_total for e in events) / 1e6
    top = [{"op": e.key, "self_cpu_s": e.self_cpu_time_total / 1e6, "calls": e.count} for e in events[:15]]
    noise = next((e.self_cpu_time_total / 1e6 for e in events if e.key == "aten::exponential_"), 0.0)
    print(f"rollout: {args.prompts} prompts x {args.group_size} samples x {args.max_new_tokens} tokens "
          f"({steps} decode steps), vocab {vocab:,}, {rollout_s:.2f} s wall under the profiler; "
          f"ops' self CPU total {profiled_total:.2f} s")
    print(f"{'op':<40} {'self CPU s':>11} {'share':>7} {'calls':>7}")
    for row in top:
        print(f"{row['op']:<40} {row['self_cpu_s']:>11.3f} {row['self_cpu_s'] / profiled_total:>7.1%} {row['calls']:>7}")
    print(f"aten::exponential_ (the per-row noise): {noise:.3f} s = {noise / profiled_total:.1%} of the ops' self CPU time")

    # part 2: the sampler alone, per generated token, at this vocabulary
    rows = args.prompts * args.group_size
    torch.manual_seed(0)
    logits = torch.randn(rows, vocab) * 3
    generators = [torch.Generator().manual_seed(sample_seed(1, i)) for i in range(rows)]
    row_sampling = SamplingParams(max_new_tokens=1, prompt_seeds=(1,))
    probs = torch.softmax(logits, dim=-1)

    def current() -> None:
        sample_next_tokens(logits, row_sampling, generators)

    def noise_only() -> None:
        torch.stack([torch.empty(vocab).exponential_(generator=g) for g in generators])

    def inverse_cdf() -> None:  # what the O(1)-noise draw would do after the same softmax
        u = torch.stack([torch.rand(1, generator=g) for g in generators])  # [A, 1]
        cdf = probs.cumsum(dim=-1)
        torch.searchsorted(cdf, u * cdf[:, -1:]).clamp_max(vocab - 1)

    def softmax_only() -> None:
        torch.softmax(logits, dim=-1)

    sampler = {name: best_of(fn, args.repeats) for name, fn in
               (("sample_next_tokens", current), ("exponential noise fill", noise_only),
                ("inverse-CDF draw (cumsum + searchsorted + A uniforms)", inverse_cdf), ("softmax", softmax_only))}
    saved_per_token = sampler["exponential noise fill"] - sampler["inverse-CDF draw (cumsum + searchsorted + A uniforms)"]
    print(f"\nsampler alone, {rows} rows x {vocab:,} vocabulary, per decode step (min of {args.repeats}):")
    for name, seconds in sampler.items():
        print(f"  {name:<55} {seconds * 1e3:8.2f} ms")
    per_rollout_noise = sampler["exponential noise fill"] * steps
    print(f"noise fill x {steps} decode steps = {per_rollout_noise:.3f} s = {per_rollout_noise / rollout_s:.1%} of the "
          f"profiled rollout's wall time; the inverse-CDF draw would save {saved_per_token * steps:.3f} s "
          f"({saved_per_token * steps / rollout_s:.1%}) of it")
    report = {"settings": {k: str(v) for k, v in vars(args).items()}, "vocab": vocab, "rows": rows,
              "decode_steps": steps, "rollout_wall_s": rollout_s, "ops_self_cpu_total_s": profiled_total,
              "top_ops": top, "exponential_self_cpu_s": noise, "exponential_share_of_ops": noise / profiled_total,
              "sampler_per_step_s": sampler, "noise_share_of_rollout_wall": per_rollout_noise / rollout_s,
              "inverse_cdf_saving_share_of_rollout_wall": saved_per_token * steps / rollout_s}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
