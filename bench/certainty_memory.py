"""Certainty statistics: chunked (urlvr's scoring pass) vs full logits materialisation, on CPU.

    .venv/bin/python bench/certainty_memory.py                       # 256 -> 4096 tokens, vocab 32768
    .venv/bin/python bench/certainty_memory.py --lengths 256 1024 --out /tmp/cert.json

Part 1 -- memory and time of the five per-token statistics (log-prob, entropy, KL(U||pi),
top-1/top-2 prob) for one response of T tokens, vocab V, from the decoder's last hidden states:
  * naive:   logits = lm_head(h) for the whole response ([T, V] float32), then the statistics
             on it (what an extra full forward that returns logits does, e.g. Intuitor's TRL copy);
  * chunked: urlvr's `TokenScorer` loop: lm_head + statistics on `chunk` positions at a time;
  * logprob: the same chunked loop computing only the old log-prob the update needs anyway --
             the baseline the certainty terms add to.
Each case runs in a fresh child process; "peak extra" is the growth of the child's peak RSS
(`ru_maxrss`) over its value after setup (weights and hidden states allocated), so it measures
the working memory of the computation itself.

Part 2 -- overhead of all certainty terms on a whole GRPO step of a small random Llama
(vocab 32768): rollout (generation), scoring pass, reward, update (forward + backward). The
overhead is (scoring pass with all five statistics - scoring pass with the log-prob only +
the five certainty reward functions) / step time. Target: <= 5%.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
METHODS = ("naive", "chunked", "logprob")
OVERHEAD_TARGET = 0.05


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child_case(method: str, length: int, vocab: int, hidden: int, chunk: int, repeats: int) -> dict:
    import torch

    from urlvr.algorithms.token_stats import BUILTIN_TOKEN_STATS as SCORE_STATS
    from urlvr.algorithms.token_stats import compute_token_stats

    torch.set_num_threads(2)
    torch.manual_seed(0)
    lm_head = torch.nn.Linear(hidden, vocab, bias=False)
    h = torch.randn(1, length, hidden)
    targets = torch.randint(0, vocab, (1, length))
    names = ("logprob",) if method == "logprob" else SCORE_STATS
    step = length if method == "naive" else chunk
    with torch.no_grad():  # warm up thread pools and kernels on 8 positions, before the baseline
        compute_token_stats(lm_head(h[:, :8]).float(), targets[:, :8], names)
    baseline = _maxrss_mb()

    def run() -> None:
        with torch.no_grad():
            for start in range(0, length, step):
                logits = lm_head(h[:, start : start + step]).float() / 1.0  # [1, step, V]
                compute_token_stats(logits, targets[:, start : start + step], names)

    times, cpu = [], []
    for _ in range(repeats):
        begin, begin_cpu = time.perf_counter(), time.process_time()
        run()
        times.append(time.perf_counter() - begin)
        cpu.append(time.process_time() - begin_cpu)
    return {"method": method, "length": length, "time_s": min(times), "cpu_s": min(cpu),
            "peak_extra_mb": _maxrss_mb() - baseline, "full_logits_mb": length * vocab * 4 / 2**20}


def child_step(vocab: int, hidden: int, layers: int, prompts: int, group_size: int, response: int, repeats: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from urlvr.rewards import certainty
    from urlvr.rewards.base import RewardContext
    from urlvr.rollout.base import PromptInput, SamplingParams
    from urlvr.rollout.collate import collate_groups, position_ids_from_attention_mask
    from urlvr.rollout.transformers_engine import TransformersRolloutEngine
    from urlvr.algorithms.token_stats import BUILTIN_TOKEN_STATS as SCORE_STATS
from urlvr.trainer.actor import TokenScorer

    torch.set_num_threads(2)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
                         num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64),
                         max_position_embeddings=4096, tie_word_embeddings=False, eos_token_id=vocab - 1, pad_token_id=0)
    model = LlamaForCausalLM(config).eval()

    class Tok:  # the engine needs eos/pad ids and decode only
        eos_token_id, pad_token_id = vocab - 1, 0

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

        def batch_decode(self, lists, skip_special_tokens=True):
            return [self.decode(ids) for ids in lists]

    engine = TransformersRolloutEngine(model, Tok(), generation_batch_size=prompts * group_size)
    scorer = TokenScorer(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    inputs = [PromptInput(f"p{i}", "", tuple(range(1 + i, 65 + i))) for i in range(prompts)]
    parts: dict[str, list[float]] = {k: [] for k in ("rollout", "score_all", "score_logprob", "reward", "update")}
    clock = time.process_time  # CPU seconds: on a shared machine far less disturbed than wall time
    for repeat in range(repeats):
        begin = clock()
        groups = engine.generate(inputs, group_size, SamplingParams(max_new_tokens=response, seed=repeat))
        parts["rollout"].append(clock() - begin)
        batch = collate_groups(groups, pad_token_id=0)
        args = (batch.input_ids, batch.attention_mask, position_ids_from_attention_mask(batch.attention_mask),
                batch.prompt_length, 1.0)
        with torch.no_grad():
            begin = clock()
            stats = scorer(*args, SCORE_STATS)
            parts["score_all"].append(clock() - begin)
            begin = clock()
            scorer(*args, ("logprob",))
            parts["score_logprob"].append(clock() - begin)
        begin = clock()
        for g, group in enumerate(groups):
            rows = slice(g * group_size, (g + 1) * group_size)
            ctx = RewardContext(answers=(None,) * group_size, response_mask=batch.response_mask[rows],
                                token_stats={k: v[rows] for k, v in stats.items()}, extract_answer=str)
            for fn in (certainty.self_certainty, certainty.token_entropy, certainty.trajectory_entropy,
                       certainty.probability):
                fn(group, ctx)
            certainty.probability_disparity(group, ctx, span="response")
        parts["reward"].append(clock() - begin)
        begin = clock()
        out = scorer(*args, ("logprob",))
        loss = -(out["logprob"] * batch.response_mask).sum() / batch.response_mask.sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        parts["update"].append(clock() - begin)
    median = {k: statistics.median(v) for k, v in parts.items()}
    step = median["rollout"] + median["score_all"] + median["reward"] + median["update"]
    extra = median["score_all"] - median["score_logprob"] + median["reward"]
    return {"clock": "process CPU time", "median_s": median, "step_s": step, "certainty_overhead_s": extra,
            "overhead_fraction": extra / step,
            "response_tokens": int(batch.response_mask.sum()), "sequences": prompts * group_size}


def run_child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=512, help="TokenScorer's chunk size (its default)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--step-response", type=int, default=256, help="response tokens in the step benchmark")
    parser.add_argument("--skip-step", action="store_true")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results" / "certainty_memory.json")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        result = child_step(*map(int, rest)) if kind == "step" else child_case(kind, *map(int, rest))
        print(json.dumps(result))
        return

    cases = []
    print(f"{'tokens':>7} {'method':>8} {'wall ms':>9} {'CPU ms':>9} {'peak extra MiB':>15} {'[T,V] fp32 MiB':>15}")
    for length in args.lengths:
        for method in METHODS:
            case = run_child(method, str(length), str(args.vocab), str(args.hidden), str(args.chunk), str(args.repeats))
            cases.append(case)
            print(f"{length:>7} {method:>8} {case['time_s'] * 1e3:>9.1f} {case['cpu_s'] * 1e3:>9.1f} "
                  f"{case['peak_extra_mb']:>15.1f} {case['full_logits_mb']:>15.1f}", flush=True)
    result = {"config": {k: v for k, v in vars(args).items() if k not in ("out", "child")},
              "machine": {"python": platform.python_version(), "platform": platform.platform()}, "cases": cases}
    if not args.skip_step:
        step = run_child("step", str(args.vocab), "256", "4", "2", "4", str(args.step_response), str(args.repeats))
        result["step"] = step
        print(f"\nGRPO step (CPU seconds), random Llama (hidden 256, 4 layers, vocab {args.vocab}), "
              f"2 prompts x 4 samples x {args.step_response} tokens:")
        for name, seconds in step["median_s"].items():
            print(f"  {name:>14}: {seconds * 1e3:8.1f} ms")
        print(f"  certainty overhead: {step['certainty_overhead_s'] * 1e3:.1f} ms = "
              f"{step['overhead_fraction']:.2%} of the step (target <= {OVERHEAD_TARGET:.0%})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
