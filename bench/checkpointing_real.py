"""Checkpointing on a real model: urlvr's update on SmolLM2 at long responses, with and without it.

    .venv/bin/python bench/checkpointing_real.py                      # 2 prompts x 4 samples, 600-1,024 tokens
    .venv/bin/python bench/checkpointing_real.py --lengths 1024 --micro-batch-size 4 --out /tmp/ckpt.json

Two children, one per side (``model.gradient_checkpointing`` false, then true), each a real
``urlvr.train`` run of 2 steps on ``--model`` (default ``urlvr/smollm2-135m-instruct``: 30 Llama
blocks, hidden 576, 49,152-token tied head). Generating 1,024 tokens per sample on a loaded 2-core
CPU takes far longer than the update, so the rollout is replaced by a registered engine
(``fixed_lengths``, below) that returns fixed synthetic responses: random non-special token ids
of the lengths given, ``finish_reason="length"``. Everything after the rollout is urlvr's own
step (collate, advantages, micro-batches, the training forward with the recomputing LM head,
backward, the DeepSpeed AdamW step). Step 1 trains on 8-token responses, so that it allocates the
gradients and AdamW moments; step 2, the measured one, on the long responses.

Measured in each child around step 2's ``update`` stage (``StageTimer``): its RSS before it
(``VmRSS``), the peak during it (``VmHWM``, reset by writing 5 to ``/proc/self/clear_refs`` at the
stage's start) and the child's whole-life peak (``ru_maxrss``). The update's activation memory is
peak during the update - RSS before it: what the training forwards keep for their backward, plus
the gradient buffers (a step's gradients are freed after its optimizer step; 538 MB for SmolLM2 in
fp32) and transient tensors. Prints a table and writes JSON (default
bench/results/checkpointing_real.json).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
SIDES = {"plain": False, "checkpointed": True}
TARGET = 0.5  # checkpointed activation memory <= half of plain


# --------------------------------------------------------------------------- child
def _status_kib(field: str) -> int:
    """A ``/proc/self/status`` field (``VmRSS``, ``VmHWM``) in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def register_fixed_engine(lengths: list[int], warmup_length: int, seed: int) -> None:
    """Registers rollout engine ``fixed_lengths``: call 1 returns ``warmup_length``-token responses,
    every later call responses of ``lengths`` (cycled over the batch's samples), ids drawn uniformly
    from [1000, vocab - 1000) (no special token: SmolLM2's specials sit below 17), log-probs 0."""
    from typing import Literal

    import torch

    from urlvr.recipe.variants import VariantSection
    from urlvr.rollout.base import ROLLOUT_ENGINES, Group, Sample

    class FixedLengthsSection(VariantSection):
        """`rollout.engine: fixed_lengths`: synthetic responses of set lengths (bench only)."""

        name: Literal["fixed_lengths"] = "fixed_lengths"

    @ROLLOUT_ENGINES.register("fixed_lengths")
    class FixedLengthsEngine:
        settings = FixedLengthsSection
        uses_trainer_module = True

        def __init__(self, vocab: int) -> None:
            self.vocab, self.calls = vocab, 0
            self.generator = torch.Generator().manual_seed(seed)

        @classmethod
        def from_recipe(cls, recipe, model, tokenizer, dist):
            return cls(model.config.vocab_size)

        def generate(self, prompts, group_size, sampling):
            self.calls += 1
            groups, index = [], 0
            for prompt in prompts:
                samples = []
                for _ in range(group_size):
                    length = warmup_length if self.calls == 1 else lengths[index % len(lengths)]
                    index += 1
                    ids = torch.randint(1000, self.vocab - 1000, (length,), generator=self.generator).tolist()
                    samples.append(Sample(tuple(ids), (0.0,) * length, "", "length"))
                groups.append(Group(prompt, tuple(samples)))
            return groups

        def sync_weights(self, model):
            pass

        def offload(self):
            pass


def run_child(settings: dict, work_dir: Path) -> dict:
    import torch

    torch.set_num_threads(settings["threads"])
    register_fixed_engine(settings["lengths"], settings["warmup_length"], settings["seed"])
    import urlvr
    import urlvr.trainer.loop as loop

    updates: list[dict] = []
    original = loop.StageTimer.__call__

    def measured(timer, stage: str):
        if stage != "update":
            return original(timer, stage)
        return _measured_update(original(timer, stage))

    @contextlib.contextmanager
    def _measured_update(inner):
        before = _status_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        started = time.perf_counter()
        with inner:
            yield
        updates.append({"rss_before_mib": before / 1024, "peak_mib": _status_kib("VmHWM") / 1024,
                        "rss_after_mib": _status_kib("VmRSS") / 1024, "seconds": time.perf_counter() - started})

    loop.StageTimer.__call__ = measured
    recipe = {
        "seed": settings["seed"], "output_dir": str(work_dir / "run"),
        "model": {"path": settings["model"], "gradient_checkpointing": settings["gradient_checkpointing"]},
        "data": {"source": {"kind": "arithmetic", "num_problems": 2 * settings["prompts"], "seed": 1},
                 "template": "chat", "shuffle": False},
        "rollout": {"group_size": settings["group_size"], "max_new_tokens": max(settings["lengths"]),
                    "engine": {"name": "fixed_lengths"}},
        "reward": {"terms": [{"name": "majority_vote"}], "oracle": None},
        "algorithm": {"kl_coef": 0.0},
        "optim": {"lr": 1e-6, "deepspeed": {"precision": "fp32"}},
        "trainer": {"total_steps": 2, "prompts_per_step": settings["prompts"], "prompts_per_minibatch": settings["prompts"],
                    "micro_batch_size": settings["micro_batch_size"], "save_every": 0, "export_final_model": False},
        "logging": {"console": False, "completions_per_step": 0},
    }
    urlvr.train(recipe)
    rows = [json.loads(line) for line in (work_dir / "run" / "metrics.jsonl").read_text().splitlines() if line]
    return {"updates": updates, "time_update_s": [row.get("time/update") for row in rows],
            "response_tokens": [row.get("perf/response_tokens") for row in rows],
            "padding": [row.get("perf/padding_fraction") for row in rows],
            "peak_rss_life_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


# --------------------------------------------------------------------------- parent
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="urlvr/smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 600, 877, 731, 962, 655, 1024, 810],
                        help="response tokens, cycled over the step's samples (mixed: 600-1,024)")
    parser.add_argument("--warmup-length", type=int, default=8, help="response tokens of step 1 (not measured)")
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results" / "checkpointing_real.json")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        settings, result = json.loads(args.child[0]), Path(args.child[1])
        with tempfile.TemporaryDirectory() as work:
            result.write_text(json.dumps(run_child(settings, Path(work))))
        return

    args.out.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "",
           "TOKENIZERS_PARALLELISM": "false"}
    sides = {}
    for side, checkpointing in SIDES.items():
        settings = {"model": args.model, "prompts": args.prompts, "group_size": args.group_size, "lengths": args.lengths,
                    "warmup_length": args.warmup_length, "micro_batch_size": args.micro_batch_size,
                    "threads": args.threads, "seed": args.seed, "gradient_checkpointing": checkpointing}
        print(f"[bench] {side} ...", flush=True)
        load_before, started = os.getloadavg()[0], time.perf_counter()
        with tempfile.NamedTemporaryFile(suffix=".json", dir=args.out.parent) as result:
            subprocess.run([sys.executable, __file__, "--child", json.dumps(settings), result.name], env=env, check=True)
            sides[side] = json.loads(Path(result.name).read_text())
        sides[side].update(settings=settings, wall_s=time.perf_counter() - started,
                           load_average_before_after=[load_before, os.getloadavg()[0]])
    print(f"\n{'side':<13} {'RSS before update MiB':>22} {'peak in update MiB':>19} {'activation MiB':>15}"
          f" {'whole-run peak MiB':>19} {'update s':>9} {'tokens':>7} {'load avg':>9}")
    for side, r in sides.items():
        u = r["updates"][-1]
        r["activation_mib"] = u["peak_mib"] - u["rss_before_mib"]
        print(f"{side:<13} {u['rss_before_mib']:>22.0f} {u['peak_mib']:>19.0f} {r['activation_mib']:>15.0f}"
              f" {r['peak_rss_life_mib']:>19.0f} {u['seconds']:>9.1f} {r['response_tokens'][-1]:>7.0f}"
              f" {'-'.join(f'{x:.1f}' for x in r['load_average_before_after']):>9}")
    ratio = sides["checkpointed"]["activation_mib"] / sides["plain"]["activation_mib"]
    peak_ratio = sides["checkpointed"]["peak_rss_life_mib"] / sides["plain"]["peak_rss_life_mib"]
    print(f"\ncheckpointed/plain: activation memory {ratio:.2f}x (target <= {TARGET}x: {'met' if ratio <= TARGET else 'NOT met'}),"
          f" whole-run peak RSS {peak_ratio:.2f}x, update time "
          f"{sides['checkpointed']['updates'][-1]['seconds'] / sides['plain']['updates'][-1]['seconds']:.2f}x")
    report = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "sides": sides,
              "ratios": {"activation": ratio, "peak_rss": peak_ratio}, "target_activation_ratio": TARGET,
              "machine": {"nproc": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
