"""What mixed lengths cost in the transformers engine: rows that end early vs rows that run to the cap.

    python bench/mixed_lengths.py [--rows 32] [--max-new-tokens 64] [--repeats 3]

The same engine, model and prompts, two tokenizer/generation-config eos settings, calls
alternating: ``mixed`` (the compute preset's eos hazard 1.5 / cap: lengths spread over the cap)
and ``full`` (eos set to the pad id, which the model never samples: every row runs to the cap).
The engine drops finished rows from the batch and the KV cache, so the cost of a call should
follow the tokens it processes. Rows fed to the model are counted with a forward pre-hook.
Prints a table and writes bench/results/mixed_lengths.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from random_model import preset_settings, save_random_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from urlvr.data.synthetic import arithmetic_problems
    from urlvr.rollout import PromptInput, SamplingParams, TransformersRolloutEngine

    path = save_random_model(BENCH_DIR / "results" / "random-compute",
                             preset_settings("compute", eos_rate=1.5 / args.max_new_tokens))
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    full_model, full_tokenizer = copy.copy(model), copy.deepcopy(tokenizer)
    full_model.generation_config = copy.deepcopy(model.generation_config)
    full_model.generation_config.eos_token_id = tokenizer.pad_token_id
    full_tokenizer.eos_token = tokenizer.pad_token
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": r.prompt}], tokenize=False, add_generation_prompt=True)
             for r in arithmetic_problems(args.rows // args.group_size, seed=1)]
    prompts = [PromptInput(f"p{i}", t, tuple(tokenizer(t, add_special_tokens=False)["input_ids"])) for i, t in enumerate(texts)]
    sampling = SamplingParams(max_new_tokens=args.max_new_tokens, prompt_seeds=tuple(range(len(prompts))))
    engines = {"mixed": TransformersRolloutEngine(model, tokenizer), "full": TransformersRolloutEngine(full_model, full_tokenizer)}
    fed = {"rows": 0}

    def count(module, args_, kwargs):
        fed["rows"] += kwargs["input_ids"].shape[0] * kwargs["input_ids"].shape[1]

    model.register_forward_pre_hook(count, with_kwargs=True)  # full_model shares the module
    runs: dict[str, list[dict]] = {name: [] for name in engines}
    for _ in range(args.repeats):
        for name, engine in engines.items():
            fed["rows"] = 0
            started = time.perf_counter()
            groups = engine.generate(prompts, args.group_size, sampling)
            seconds = time.perf_counter() - started
            lengths = [len(s.token_ids) for g in groups for s in g.samples]
            runs[name].append({"seconds": seconds, "response_tokens": sum(lengths), "positions_fed": fed["rows"],
                               "lengths": lengths})
    summary = {name: {"median_s": statistics.median(r["seconds"] for r in rs),
                      "response_tokens": statistics.fmean(r["response_tokens"] for r in rs),
                      "positions_fed": statistics.fmean(r["positions_fed"] for r in rs)} for name, rs in runs.items()}
    ratio = {key: summary["mixed"][key] / summary["full"][key] for key in ("median_s", "response_tokens", "positions_fed")}
    print(f"{'side':<6} {'median s':>9} {'response tokens':>16} {'positions fed':>14}")
    for name, r in summary.items():
        print(f"{name:<6} {r['median_s']:>9.3f} {r['response_tokens']:>16.0f} {r['positions_fed']:>14.0f}")
    print(f"mixed/full: time {ratio['median_s']:.2f}x, response tokens {ratio['response_tokens']:.2f}x, "
          f"positions fed {ratio['positions_fed']:.2f}x")
    out = BENCH_DIR / "results" / "mixed_lengths.json"
    out.write_text(json.dumps({"settings": vars(args), "summary": summary, "ratios_mixed_over_full": ratio, "runs": runs}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
